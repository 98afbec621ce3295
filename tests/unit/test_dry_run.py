"""``megalite train --dry-run``: the plan's numbers against real models, clear errors, and that
nothing is trained or written."""
import os

import pytest
import torch

from megalite.cli import main
from megalite.training.prepare import parse_train_args
from megalite.errors import MegaliteError
from megalite.training.dry_run import GIB, activation_bytes_per_layer, plan_run

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "megalite", "configs", "tiny-gpt.yaml")
LLAMA = os.path.join(os.path.dirname(__file__), "..", "..", "megalite", "configs", "tiny-llama.yaml")
BERT = os.path.join(os.path.dirname(__file__), "..", "..", "megalite", "configs", "tiny-bert.yaml")


def _config(*extra, config=CONFIG):
    return parse_train_args(["--config", config, "--mock-data", *extra])


def _full_model_params(cfg) -> int:
    """Parameters of the whole model built in one piece on the meta device."""
    from megalite.distributed.parallel_state import ParallelState
    from megalite.parallel.context import ModelContext
    from megalite.parallel.pipeline.stages import build_model_chunks

    (model,) = build_model_chunks(cfg.model, ModelContext(ParallelState.single(), device="meta"))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("config,world,tp,pp,vp", [
    (CONFIG, 8, 2, 2, None),      # tied embedding: the last stage's copy is not counted twice
    (LLAMA, 4, 1, 4, None),
    (LLAMA, 4, 2, 2, 1),          # interleaved: 2 chunks per stage
    (BERT, 8, 2, 2, None),        # BERT: heads on the last stage, tied embedding
])
def test_parameters_add_up_to_the_whole_model(config, world, tp, pp, vp):
    extra = ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]
    if vp:
        extra += ["--num-layers-per-virtual-pipeline-stage", str(vp)]
    cfg = _config(*extra, config=config)
    plan = plan_run(cfg, world)
    assert (plan.tp, plan.pp, plan.dp) == (tp, pp, world // (tp * pp))
    # exact: padded vocabulary is the same (both padded for this tp) and shards partition it
    whole = _full_model_params(_config(config=config, *(
        ["--make-vocab-size-divisible-by", str(128 * tp)] if tp > 1 else [])))
    assert plan.total_params == whole
    layers = [b - a for st in plan.stages for a, b in st.layer_ranges]
    assert sum(layers) == cfg.model.num_layers
    if vp:
        assert plan.vp == cfg.model.num_layers // (pp * vp)
        assert all(len(st.layer_ranges) == plan.vp for st in plan.stages)


def test_memory_formula_fp32_and_zero():
    cfg = _config("--tensor-model-parallel-size", "2")
    st = plan_run(cfg, 4).stages[0]  # dp 2, fp32: 4 bytes weights, 4 grads, 8 Adam, no master
    p = st.params
    assert st.memory_bytes["weights"] == p * 4 and st.memory_bytes["grads"] == p * 4
    assert st.memory_bytes["optimizer"] == p * 8
    # tiny-gpt: causal SDPA without dropout keeps no s x s scores (fused kernel): no 5as/h
    s, b, h = 64, 4, 64
    per_layer = s * b * h * (10 + 24 / 2) * 2  # x2: fp32 activations
    assert activation_bytes_per_layer(cfg, 2) == per_layer
    assert st.memory_bytes["activations"] == per_layer * 4  # 4 layers, 1 microbatch in flight
    bf16_z3 = plan_run(_config("--bf16", "--zero-stage", "3"), 4).stages[0]
    q = bf16_z3.params
    assert bf16_z3.memory_bytes["weights"] == q * 2 / 4
    assert bf16_z3.memory_bytes["optimizer"] == q * 12 / 4


@pytest.mark.parametrize("args,world,message", [
    (["--tensor-model-parallel-size", "4"], 6, "world size 6 is not divisible"),
    (["--tensor-model-parallel-size", "8"], 8, "num_attention_heads=4 is not divisible by 8"),
    (["--pipeline-model-parallel-size", "3"], 3, "--num-layers 4 is not divisible"),
    (["--global-batch-size", "12"], 8, "not a multiple of --micro-batch-size 4 x data-parallel"),
])
def test_layout_errors(args, world, message):
    with pytest.raises(MegaliteError, match=message):
        plan_run(_config(*args), world)


def test_cli_dry_run_prints_plan_and_trains_nothing(tmp_path, capsys):
    save = tmp_path / "ckpt"
    rc = main(["train", "--config", CONFIG, "--mock-data", "--dry-run", "--world-size", "8",
               "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
               "--save", str(save)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "8 process(es) = TP 2 x PP 2 x DP 2" in out
    assert "stage 0: layers [0, 2)" in out and "stage 1: layers [2, 4)" in out
    assert "2 microbatch(es)" in out and "GiB" in out
    assert not save.exists()
    assert not torch.distributed.is_initialized()
    # --world-size without --dry-run is refused (the launcher decides the world size)
    assert main(["train", "--config", CONFIG, "--mock-data", "--world-size", "4"]) == 2
    assert "--world-size is for --dry-run" in capsys.readouterr().err
    for bad in ("0", "-2"):      # not taken for "unset"
        assert main(["train", "--config", CONFIG, "--mock-data", "--dry-run",
                     "--world-size", bad]) == 2
        assert f"--world-size must be a positive integer, got {bad}" in capsys.readouterr().err


def test_data_paths_are_checked(tmp_path, corpus_token_dataset, sp_model, capsys):
    base = ["train", "--config", CONFIG, "--dry-run", "--tokenizer-type", "SentencePieceTokenizer",
            "--tokenizer-model", sp_model]
    assert main(base + ["--data-path", corpus_token_dataset]) == 0
    out = capsys.readouterr().out
    assert f"{corpus_token_dataset}: " in out and " documents, " in out
    missing = str(tmp_path / "nope")
    assert main(base + ["--data-path", missing]) == 2
    assert f"{missing}.idx" in capsys.readouterr().err
    assert main(base[:-1] + [str(tmp_path / "no.model"), "--data-path",
                             corpus_token_dataset]) == 2
    assert "no.model" in capsys.readouterr().err


def test_bert_dry_run(wordpiece_sentence_dataset, wordpiece_vocab, sp_model, capsys):
    base = ["train", "--config", BERT, "--dry-run", "--data-path", wordpiece_sentence_dataset,
            "--world-size", "4", "--tensor-model-parallel-size", "2"]
    wordpiece = ["--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file", wordpiece_vocab]
    assert main(base + wordpiece) == 0
    out = capsys.readouterr().out
    # the model vocabulary is the BERT data's: vocab.txt (2000) + [BOS] + [EOS]
    assert "model: BERT pre-norm, 4 layers" in out and "vocab 2002 (padded 2048)" in out
    assert f"{wordpiece_sentence_dataset}: " in out and "stage 0: layers [0, 4)" in out
    cfg = parse_train_args(base[1:] + wordpiece)
    plan = plan_run(cfg, 4)
    assert plan.total_params == _full_model_params(parse_train_args(
        base[1:] + wordpiece + ["--make-vocab-size-divisible-by", "256"]))
    s, b, h = 64, 4, 64     # tiny-bert: the transformer layers' estimate, as GPT's; its
    assert plan.stages[0].memory_bytes["activations"] == \
        4 * s * b * h * (10 + 24 / 2) * 2      # padding mask keeps the fused kernel: no 5as/h
    assert "activations: attention scores not stored: fused SDPA on " in out
    # BERT data needs a WordPiece vocabulary: refused before anything runs
    assert main(base + ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                        sp_model]) == 2
    err = capsys.readouterr().err
    assert "--model-type bert: BERT and T5 data need a WordPiece vocabulary" in err
