"""Megatron-LM's own GPT example launch scripts through ``megalite train``.

The command lines are Megatron-LM's (examples/gpt3/train_gpt3_857m_distributed.sh, and at
core_v0.16.1 examples/gpt3/train_gpt3_175b_distributed.sh and
examples/llama/train_llama3_8b_h100_fp8.sh) with every flag kept; only sizes (layers, widths,
sequence, batch, iterations, parallel sizes, intervals) and paths are made small and local.
The GPT-3 one runs unchanged on real data tokenized with GPT-2's BPE files (--vocab-file
--merge-file, Megatron-LM's default GPT2BPETokenizer); its learning rate at every logged
iteration is megatron-core's OptimizerParamScheduler's value (compared for equality). The other
two stop at their first flag megalite refuses, with the one-line reason.
"""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from megalite.cli import run_main
from megalite.training import main as train_main

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler


def _gpt3_857m(data, vocab, merges, ckpt, tb, micro=2, global_batch=4, iters=20):
    """examples/gpt3/train_gpt3_857m_distributed.sh, argument arrays in their order."""
    gpt_model_args = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                      "--seq-length", "64", "--max-position-embeddings", "64",
                      "--attention-backend", "auto"]
    training_args = ["--micro-batch-size", str(micro), "--global-batch-size", str(global_batch),
                     "--train-iters", str(iters), "--weight-decay", "0.1", "--adam-beta1", "0.9",
                     "--adam-beta2", "0.95", "--init-method-std", "0.006", "--clip-grad", "1.0",
                     "--fp16", "--lr", "6.0e-5", "--lr-decay-style", "cosine", "--min-lr",
                     "6.0e-6", "--lr-warmup-fraction", ".001", "--lr-decay-iters", "18"]
    model_parallel_args = ["--tensor-model-parallel-size", "1",
                           "--pipeline-model-parallel-size", "1"]
    data_args = ["--data-path", data, "--vocab-file", vocab, "--merge-file", merges,
                 "--split", "949,50,1"]
    eval_and_logging_args = ["--log-interval", "5", "--save-interval", "10", "--eval-interval",
                             "10", "--save", ckpt, "--load", ckpt, "--eval-iters", "2",
                             "--tensorboard-dir", tb]
    return (gpt_model_args + training_args + model_parallel_args + data_args
            + eval_and_logging_args)


def test_gpt3_example_runs_unchanged_with_megatrons_learning_rate(
        wide_dataset, hf_tokenizer_json, tmp_path, capsys):
    from tokenizers import Tokenizer

    vocab, merges = Tokenizer.from_file(hf_tokenizer_json).model.save(str(tmp_path))
    ckpt, tb, log = str(tmp_path / "ckpt"), str(tmp_path / "tb"), str(tmp_path / "log.jsonl")
    os.makedirs(ckpt)   # megalite refuses a --load path that does not exist (see README)
    argv = _gpt3_857m(wide_dataset, vocab, merges, ckpt, tb)
    assert run_main(train_main.main, argv + ["--log-json", log]) == 0
    out = capsys.readouterr().out
    assert out.startswith("notice: --attention-backend is ignored: megalite's attention is "
                          "torch.nn.functional.scaled_dot_product_attention")
    assert "tokenizer: GPT2BPETokenizer " + vocab + " (model vocabulary 2000)" in out
    assert sorted(os.listdir(ckpt)) == ["iter_0000010", "iter_0000020", "latest"]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tb))
    with open(log) as f:
        records = [json.loads(line) for line in f]
    train = [r for r in records if r["split"] == "train"]
    assert [r["iteration"] for r in train] == [5, 10, 15, 20]
    assert [r["iteration"] for r in records if r["split"] == "valid"] == [10, 20]
    assert all(r["loss"] is not None and 0 < r["loss"] < 10 for r in train)
    # Megatron-LM's scheduler for these flags: steps in samples, warmup .001 x 18 x 4 samples
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=6e-5)
    ref = OptimizerParamScheduler(opt, init_lr=0.0, max_lr=6e-5, min_lr=6e-6,
                                  lr_warmup_steps=.001 * 18 * 4, lr_decay_steps=18 * 4,
                                  lr_decay_style="cosine", start_wd=0.1, end_wd=0.1,
                                  wd_incr_steps=20 * 4, wd_incr_style="constant")
    expected = {}
    for t in range(1, 21):
        ref.step(4)
        expected[t] = opt.param_groups[0]["lr"]
    assert [r["lr"] for r in train] == [expected[t] for t in (5, 10, 15, 20)]
    # the same command again resumes from iteration 20: nothing left to train
    assert run_main(train_main.main, argv) == 0
    assert "resumed from " + ckpt + " at iteration 20; 0 iterations to go" in \
        capsys.readouterr().out
    # the checkpoint names its GPT-2 tokenizer (vocab + merges): generate finds it alone
    from megalite import generate
    assert run_main(generate.main, ["--load", ckpt, "--prompt", "The return statement",
                                    "--max-new-tokens", "3", "--greedy"]) == 0
    continuation = capsys.readouterr().out
    assert continuation.strip() and continuation.count("\n") == 1   # 3 tokens' text, one line


def test_gpt3_175b_example_stops_at_the_batch_size_ramp_up(capsys):
    """core_v0.16.1's 175B script ramps the batch size up, which Megatron-LM itself refuses with
    --train-iters; megalite names the flag."""
    argv = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
            "--seq-length", "64", "--max-position-embeddings", "64", "--attention-backend",
            "auto", "--micro-batch-size", "1", "--global-batch-size", "16",
            "--rampup-batch-size", "4", "4", "64", "--train-iters", "20", "--weight-decay",
            "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--init-method-std", "0.006",
            "--clip-grad", "1.0", "--fp16", "--lr", "6.0e-5", "--lr-decay-style", "cosine",
            "--min-lr", "6.0e-6", "--lr-warmup-fraction", ".001", "--lr-decay-iters", "18",
            "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1",
            "--mock-data", "--vocab-size", "1000"]
    assert run_main(train_main.main, argv) == 2
    err = capsys.readouterr().err
    assert err == ("error: --rampup-batch-size: megalite trains with one global batch size from "
                   "the first iteration (Megatron-LM refuses the ramp-up with --train-iters too, "
                   "and replaces it by --step-batch-size-schedule) (a Megatron-LM flag megalite "
                   "refuses; see megalite train --help)\n")


@pytest.mark.parametrize("drop, first_refused", [
    ((), "--apply-layernorm-1p"),
    (("--apply-layernorm-1p",), "--decoupled-lr"),
    (("--apply-layernorm-1p", "--decoupled-lr", "--decoupled-min-lr"), "--grad-reduce-in-bf16"),
    (("--apply-layernorm-1p", "--decoupled-lr", "--decoupled-min-lr", "--grad-reduce-in-bf16"),
     "--fp8-format"),
    (("--apply-layernorm-1p", "--decoupled-lr", "--decoupled-min-lr", "--grad-reduce-in-bf16",
      "--fp8-format", "--fp8-amax-history-len", "--fp8-amax-compute-algo", "--fp8-param-gather"),
     None),
])
def test_llama3_example_names_each_flag_that_would_change_the_numbers(drop, first_refused,
                                                                      tmp_path, capsys):
    """The LLaMA-3 8B FP8 script (mock-data branch): its flags megalite refuses, one at a time,
    in the order they come."""
    model = ["--use-mcore-models", "--num-layers", "2", "--hidden-size", "64",
             "--ffn-hidden-size", "128", "--num-attention-heads", "4", "--group-query-attention",
             "--num-query-groups", "2", "--kv-channels", "16", "--seq-length", "64",
             "--max-position-embeddings", "64", "--position-embedding-type", "rope",
             "--rotary-base", "1000000", "--rotary-percent", "1.0", "--attention-dropout", "0.0",
             "--hidden-dropout", "0.0", "--swiglu", "--init-method-std", "0.0134",
             "--attention-backend", "fused", "--apply-layernorm-1p",
             "--untie-embeddings-and-output-weights", "--disable-bias-linear"]
    training = ["--micro-batch-size", "1", "--global-batch-size", "4", "--train-samples", "400",
                "--lr-decay-samples", "390", "--lr-warmup-samples", "8", "--lr", "0.00015",
                "--min-lr", "0.00001", "--decoupled-lr", "5.0e-4", "--decoupled-min-lr",
                "4.5e-5", "--lr-decay-style", "cosine", "--clip-grad", "1.0", "--weight-decay",
                "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--bf16",
                "--grad-reduce-in-bf16", "--cross-entropy-loss-fusion",
                "--calculate-per-token-loss", "--manual-gc", "--empty-unused-memory-level", "1",
                "--exit-duration-in-mins", "235"]
    ddp = ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"]
    dtype = ["--fp8-format", "hybrid", "--fp8-amax-history-len", "1024",
             "--fp8-amax-compute-algo", "max", "--fp8-param-gather"]
    parallel = ["--tensor-model-parallel-size", "1", "--context-parallel-size", "1",
                "--sequence-parallel"]
    data = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1000",
            "--tiktoken-pattern", "v2", "--split", "99,1,0",
            "--no-create-attention-mask-in-dataloader", "--no-mmap-bin-files",
            "--num-workers", "1"]
    logging = ["--log-interval", "1", "--eval-iters", "2", "--eval-interval", "10",
               "--save-interval", "10", "--log-throughput", "--profile",
               "--profile-step-start", "4", "--profile-step-end", "6", "--ckpt-format",
               "torch_dist", "--distributed-timeout-minutes", "60", "--save", str(tmp_path),
               "--load", str(tmp_path), "--tensorboard-dir", str(tmp_path / "tb")]
    argv = model + training + ddp + dtype + parallel + data + logging
    kept = []
    skip = 0
    for token in argv:   # drop the given flags and their values
        if skip and not token.startswith("--"):
            continue
        skip = token in drop
        if not skip:
            kept.append(token)
    rc = run_main(train_main.main, kept + ["--dry-run"])
    out, err = capsys.readouterr()
    if first_refused is None:   # the rest runs, with one notice per flag megalite ignores
        assert rc == 0 and err == "", err
        notices = [line.split(" is ignored")[0] for line in out.splitlines()
                   if line.startswith("notice:")]
        assert notices == [f"notice: {flag}" for flag in (
            "--attention-backend", "--cross-entropy-loss-fusion", "--manual-gc",
            "--empty-unused-memory-level", "--overlap-param-gather",
            "--tiktoken-pattern", "--no-mmap-bin-files", "--num-workers", "--profile",
            "--profile-step-start", "--profile-step-end", "--ckpt-format",
            "--overlap-grad-reduce")]   # implemented, but not under ZeRO (a later notice)
        assert "ZeRO stage 1" in out   # --use-distributed-optimizer
        return
    assert rc == 2
    assert err.startswith(f"error: {first_refused}") and err.count("\n") == 1, err


def test_vocab_and_merge_files_give_megatrons_gpt2_tokenizer(hf_tokenizer_json, corpus_texts,
                                                            tmp_path):
    """Without --tokenizer-type, Megatron-LM's pretrain_gpt.py builds GPT2BPETokenizer from
    --vocab-file/--merge-file: GPT-2's byte-level BPE, vocabulary = the vocab.json entries, eod
    = <|endoftext|>. Megatron-LM's own GPT-2 code (megatron/training/tokenizer) is not in the
    megatron-core package; the reference is transformers' GPT2Tokenizer built from the same two
    files (GPT-2's definition as transformers sets it up), compared id for id."""
    from tokenizers import Tokenizer
    from transformers import GPT2Tokenizer

    from megalite.training.prepare import parse_train_args
    from megalite.data.tokenizers import build_tokenizer

    vocab, merges = Tokenizer.from_file(hf_tokenizer_json).model.save(str(tmp_path))
    config = parse_train_args(["--model-preset", "tiny", "--mock-data", "--vocab-file", vocab,
                               "--merge-file", merges])
    data = config.data
    ours = build_tokenizer(data.tokenizer_type, data.tokenizer_model, data.vocab_file,
                           data.merge_file)
    ref = GPT2Tokenizer(vocab, merges)
    assert data.tokenizer_type == "GPT2BPETokenizer"
    with open(vocab, encoding="utf-8") as f:
        entries = json.load(f)
    assert ours.vocab_size == len(entries) == len(ref.get_vocab()) == config.model.vocab_size
    assert ours.eod == entries["<|endoftext|>"] == ref.convert_tokens_to_ids("<|endoftext|>")
    for text in corpus_texts[:150]:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False), text[:60]
