"""``megalite convert``: Hugging Face export/import and offline resharding, end to end.

A real 4-process TP=2 x PP=2 run (gloo, the built-in corpus tokenized with a SentencePiece
model) trains both recipes for 6 iterations and saves at iterations 3 and 6; ``latest`` is then
pointed at iteration 3. From those checkpoints:

* to-hf: ``AutoModelForCausalLM.from_pretrained`` gives the logits of the megalite model within
  1e-4 absolute (float32). Why 1e-4: the same math in other kernels and summation orders
  (HF eager attention, Conv1D addmm) agrees to float32 rounding over 4 layers (~1e-6 measured);
  a mapping error (a swapped head, a missed transpose) moves logits by ~1e-1. The weights are
  trained from a std-0.2 init, so logits are O(1)-O(10) and the check is sensitive (asserted).
  The HF tensors must also equal the name map applied to the megalite weights bit for bit.
* from-hf into TP=2 x PP=2: every rank of a real 4-process group loads exactly (bitwise) its
  shard of the HF weights, and training continues from them: the first iteration's loss is the
  HF model's cross-entropy on that batch (1e-5 relative, float32 summation order only).
* reshard to TP=1 x PP=4 (LLaMA), TP=4 x PP=1 (classic; tiny LLaMA has 2 key/value groups) and
  TP=1 x PP=1 (LLaMA, resumed as DP=4), optimizer state included: the
  resumed run's iterations 4-6 equal the uninterrupted TP=2 x PP=2 run's within 1e-4 relative
  (only the summation order differs; measured ~1e-6, as in the online layout-change tests).
* --verify fails (exit 2, nothing at --save) when a converted tensor is wrong (a fault injected
  into the name map's q/k/v regrouping); bad inputs give ``error: ...`` and exit 2.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from harness import DistributedWorkers
from hf_common import scale_up_

from megalite.cli import main as megalite_main

CONFIGS = Path(__file__).resolve().parents[2] / "megalite" / "configs"
RECIPES = {"classic": str(CONFIGS / "tiny-gpt.yaml"), "llama": str(CONFIGS / "tiny-llama.yaml")}
TOL = 1e-4


def _args(recipe, prefix, sp, tp, pp, extra=()):
    from megalite.training.prepare import parse_train_args
    return parse_train_args([
        "--config", RECIPES[recipe], "--data-path", prefix, "--split", "98,2,0",
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp,
        "--micro-batch-size", "1", "--global-batch-size", "4", "--seq-length", "32",
        "--train-iters", "6", "--lr", "1e-3", "--lr-warmup-iters", "1", "--eval-iters", "0",
        "--log-interval", "100", "--seed", "7", "--init-method-std", "0.2",
        "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
        *extra])


def w_train(root, prefix, sp):
    """Both recipes at TP=2 x PP=2: 6 iterations saving at 3 and 6; latest -> iteration 3."""
    import torch.distributed as dist

    from megalite.distributed.parallel_state import ParallelState
    from megalite.training.trainer import pretrain
    ps = ParallelState.build(2, 2)
    losses = {}
    for recipe in RECIPES:
        save = os.path.join(root, recipe)
        losses[recipe] = pretrain(_args(recipe, prefix, sp, 2, 2, [
            "--save", save, "--save-interval", "3"]), ps).losses
        dist.barrier()
        if ps.rank == 0:
            with open(os.path.join(save, "latest"), "w") as f:
                f.write("iter_0000003\n")
        dist.barrier()
    return losses


def w_resume(directory, recipe, prefix, sp, tp, pp):
    from megalite.distributed.parallel_state import ParallelState
    from megalite.training.trainer import pretrain
    ps = ParallelState.build(tp, pp)
    return pretrain(_args(recipe, prefix, sp, tp, pp, ["--load", directory]), ps).losses


def w_from_hf(ckpt, hf_dir):
    """Start a real trainer from a from-hf TP=2 x PP=2 checkpoint (`--load`, as `megalite train
    --load` does): every shard must equal the HF weights' shard bitwise; then 3 training steps
    with a fresh optimizer (weights-only)."""
    from megalite.checkpoint import read_train_config
    from megalite.convert import from_hf
    from megalite.convert.hf_io import HFReader
    from megalite.distributed.parallel_state import ParallelState
    from megalite.parallel.sharding import shard_tensor
    from megalite.training.trainer import Trainer
    ps = ParallelState.build(2, 2)
    tc = read_train_config(ckpt)
    tc = dataclasses.replace(
        tc, data=dataclasses.replace(tc.data, mock_data=True),
        training=dataclasses.replace(tc.training, train_iters=3, micro_batch_size=1,
                                     global_batch_size=2, eval_iters=0, log_interval=100,
                                     save=None, load=str(ckpt)))
    trainer = Trainer(tc, ps)
    hf = HFReader(hf_dir)
    full = from_hf({n: hf.get(n) for n in hf.names()}, tc.model, tc.model.padded_vocab(2))
    mismatched = []
    for chunk in trainer.model_chunks:
        for name, p in chunk.named_parameters():
            src = "embedding.word_embeddings.weight" if getattr(
                p, "shared_embedding", False) else name
            want = shard_tensor(full[src], getattr(p, "tensor_parallel_dim", None),
                                getattr(p, "partition_stride", 1), ps.tp_rank, ps.tp_size)
            if not torch.equal(p.detach(), want):
                mismatched.append(name)
    return (trainer.weights_only_start, mismatched, trainer.train().losses, trainer.seq_length,
            tc.training.seed, tc.training.global_batch_size)


@pytest.fixture(scope="module")
def workers():
    with DistributedWorkers(4) as w:
        yield w


@pytest.fixture(scope="module")
def trained(workers, corpus_token_dataset, sp_model, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("convert_src"))
    losses = workers.run(w_train, root, corpus_token_dataset, sp_model, timeout=900)[0]
    return root, losses


def convert(*argv) -> int:
    return megalite_main(["convert", *map(str, argv)])


def megalite_logits(ckpt, tokens):
    from megalite.checkpoint import load_model_weights, read_model_config
    from megalite.distributed.parallel_state import ParallelState
    from megalite.model.gpt import GPTModel
    from megalite.parallel.context import ModelContext
    cfg = read_model_config(ckpt)
    model = GPTModel(cfg, ModelContext(ParallelState.single())).eval()
    load_model_weights(ckpt, [model], ParallelState.single())
    with torch.no_grad():
        return model(tokens)[..., :cfg.vocab_size], model, cfg


# -- to-hf ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_to_hf_from_tp2pp2_gives_equal_logits(trained, recipe, tmp_path, capsys, sp_model):
    from megalite.convert import architecture_module as _module
    root, _ = trained
    out = tmp_path / "hf"
    assert convert("to-hf", "--load", os.path.join(root, recipe), "--save", out,
                   "--verify") == 0
    assert "verify: max |megalite - HF| logit difference" in capsys.readouterr().err
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == ("LlamaForCausalLM" if recipe == "llama" else "GPT2LMHeadModel")
    tokens = torch.randint(0, hf.config.vocab_size, (2, 24), generator=torch.Generator()
                           .manual_seed(0))
    ours, model, cfg = megalite_logits(os.path.join(root, recipe), tokens)
    with torch.no_grad():
        theirs = hf(input_ids=tokens).logits
    assert theirs.abs().max() > 1.0                      # a sensitive comparison
    err = (ours - theirs).abs().max().item()
    assert err <= TOL, f"max |megalite - HF| = {err}"
    # The exported tensors are the name map applied to the trained weights, bit for bit.
    state = hf.state_dict()
    params = dict(model.named_parameters())
    for m in _module("llama" if recipe == "llama" else "gpt2").param_mappings(
            cfg, cfg.padded_vocab(1)):
        for name, t in zip(m.hf, m.to_hf(params[m.megalite].detach())):
            assert torch.equal(state[name], t), name
    # SentencePiece training tokenizer: its model travels with the weights and HF reads it
    # with the training ids, for both architectures (every corpus document is checked in
    # test_hf_tokenizer_export.py); config.json names its eos.
    import sentencepiece as spm
    assert (out / "tokenizer.model").read_bytes() == Path(sp_model).read_bytes()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    text = "Checkpoint  conversion\nkeeps every token id,   and the logits too. "
    assert tok(text).input_ids == sp.encode(text)
    assert hf.config.eos_token_id == tok.eos_token_id == sp.eos_id()


def test_verify_catches_a_wrong_tensor_and_leaves_nothing(trained, tmp_path, monkeypatch,
                                                          capsys):
    """Fault injection: the q/k/v regrouping swaps two query heads (a classic conversion bug);
    the export must fail with exit 2 and leave nothing at --save, then succeed when fixed."""
    from megalite.convert import hf_llama
    original = hf_llama.grouped_to_qkv

    def swapped(t, a, g, d):
        q, k, v = original(t, a, g, d)
        q = q.clone()
        q[:d], q[d:2 * d] = q[d:2 * d].clone(), q[:d].clone()
        return q, k, v
    monkeypatch.setattr(hf_llama, "grouped_to_qkv", swapped)
    root, _ = trained
    out = tmp_path / "hf"
    assert convert("to-hf", "--load", os.path.join(root, "llama"), "--save", out,
                   "--verify") == 2
    err = capsys.readouterr().err
    assert "error: --verify failed" in err and "exceeds 0.0001" in err
    assert not out.exists() and os.listdir(tmp_path) == []      # no temporary left either


# -- reshard --------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe,tp,pp", [("llama", 1, 4), ("classic", 4, 1), ("llama", 1, 1)],
                         ids=["llama-tp1xpp4", "classic-tp4", "llama-tp1-dp4"])
def test_reshard_with_optimizer_continues_the_loss_curve(
        trained, workers, recipe, tp, pp, tmp_path, capsys, corpus_token_dataset, sp_model):
    root, losses = trained
    out = tmp_path / "resharded"
    assert convert("reshard", "--load", os.path.join(root, recipe), "--save", out,
                   "--target-tensor-parallel-size", tp,
                   "--target-pipeline-model-parallel-size", pp) == 0
    assert "optimizer state included" in capsys.readouterr().err
    meta = json.loads((out / "iter_0000003" / "meta.json").read_text())
    assert meta["layout"] == {"tp_size": tp, "pp_size": pp, "dp_size": 1, "vp_size": 1,
                              "world_size": tp * pp, "ep_size": 1}
    if tp * pp == 1:
        assert_same_optimizer_state(os.path.join(root, recipe, "iter_0000003"),
                                    str(out / "iter_0000003"))
    resumed = workers.run(w_resume, str(out), recipe, corpus_token_dataset, sp_model,
                          tp, pp, timeout=600)[0]
    full = losses[recipe]
    assert len(resumed) == 3
    for a, b in zip(full[3:], resumed, strict=True):
        assert abs(a - b) <= 1e-4 * abs(a), (full, resumed)


def assert_same_optimizer_state(src: str, dst: str) -> None:
    """The TP=1 x PP=1 rank file holds the TP=2 x PP=2 run's Adam moments, unsharded, bit for
    bit (real vocabulary rows; padding rows may differ in number)."""
    from megalite.parallel.sharding import unshard_tensors
    meta = json.loads(Path(src, "meta.json").read_text())
    vocab = meta["model_config"]["vocab_size"]
    shards: dict = {}
    for rank in range(4):               # TP=2 x PP=2 x DP=1: rank = pp * 2 + tp
        opt = torch.load(os.path.join(src, f"rank_{rank:05d}.pt"), weights_only=True)["optimizer"]
        for i, name in enumerate(opt["param_names"]):
            shards.setdefault(name, {})[rank % 2] = opt["adamw"]["state"][i]
    new = torch.load(os.path.join(dst, "rank_00000.pt"), weights_only=True)["optimizer"]
    assert sorted(new["param_names"]) == sorted(shards)
    for i, name in enumerate(new["param_names"]):
        e = meta["tensors"][name]
        for key in ("exp_avg", "exp_avg_sq"):
            parts = [shards[name][r][key] for r in sorted(shards[name])]
            full = unshard_tensors(parts, e["tensor_parallel_dim"], e["partition_stride"])
            got = new["adamw"]["state"][i][key]
            if name.startswith(("embedding.word", "output_layer")):
                full, got = full[:vocab], got[:vocab]
            assert torch.equal(full, got), (name, key)
        assert new["adamw"]["state"][i]["step"] == shards[name][0]["step"]


# -- from-hf --------------------------------------------------------------------------------------
def hf_random_model(recipe, path):
    from megalite.convert import config_to_hf
    from megalite.model import get_preset
    llama = get_preset("tiny-llama").replace(num_attention_heads=8, num_query_groups=2,
                                             vocab_size=500, num_layers=4)
    cfg = {"llama": llama,
           # Qwen2ForCausalLM: q/k/v biases only, tied embeddings
           "qwen2": llama.replace(add_qkv_bias=True, untie_embeddings_and_output_weights=False),
           # Llama 3.1's rope scaling, all three frequency regimes at head_dim 8
           "llama3.1": llama.replace(rotary_base=500.0, rope_scaling="llama3",
                                     rope_original_max_position_embeddings=32),
           "classic": get_preset("tiny").replace(vocab_size=500, num_layers=4)}[recipe]
    torch.manual_seed(3)
    model = transformers.AutoModelForCausalLM.from_config(config_to_hf(cfg))
    scale_up_(model)
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("recipe", [*RECIPES, "qwen2", "llama3.1"])
def test_from_hf_into_tp2pp2_loads_exactly_and_trains(workers, recipe, tmp_path, capsys):
    hf_dir, ckpt = tmp_path / "hf", tmp_path / "ckpt"
    model = hf_random_model(recipe, hf_dir)
    assert convert("from-hf", "--load", hf_dir, "--save", ckpt, "--verify",
                   "--target-tensor-parallel-size", 2,
                   "--target-pipeline-model-parallel-size", 2) == 0
    assert "verify: max |megalite - HF|" in capsys.readouterr().err
    tokens = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    ours, _, _ = megalite_logits(str(ckpt), tokens)
    with torch.no_grad():
        theirs = model.eval()(input_ids=tokens).logits
    assert theirs.abs().max() > 1.0
    assert (ours - theirs).abs().max().item() <= TOL
    results = workers.run(w_from_hf, str(ckpt), str(hf_dir), timeout=600)
    for weights_only, mismatched, losses, *_ in results:
        assert weights_only and mismatched == []
        assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
        assert losses == results[0][2]
    # The first training loss is the HF model's cross-entropy on that same first global batch
    # (mock data: samples 0..G-1); 1e-5 relative: float32 summation order only (TP/PP split).
    from megalite.data.gpt_dataset import MockGPTDataset
    losses, seq, seed, g = results[0][2:]
    batch = torch.stack([torch.from_numpy(MockGPTDataset(500, seq, g, seed)[i]) for i in range(g)])
    with torch.no_grad():
        logits = model(input_ids=batch[:, :-1]).logits
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 500), batch[:, 1:].reshape(-1))
    assert abs(losses[0] - ref.item()) <= 1e-5 * ref.item(), (losses[0], ref.item())


def test_hf_tokenizer_json_travels_to_hf(hf_tokenizer_json, corpus_texts, tmp_path):
    """A run trained with --tokenizer-type HuggingFaceTokenizer: to-hf copies its tokenizer.json
    and AutoTokenizer reads the same token ids from the exported directory."""
    from megalite.convert.hf_tokenizer import write_tokenizer_files
    from megalite.data.tokenizers import build_tokenizer
    out = tmp_path / "hf"
    out.mkdir()
    files, ids = write_tokenizer_files(hf_tokenizer_json, "HuggingFaceTokenizer", str(out))
    assert files == ["tokenizer.json", "tokenizer_config.json"]
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    ours = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=hf_tokenizer_json)
    for text in corpus_texts[:20]:
        assert theirs(text, add_special_tokens=False).input_ids == ours.encode(text)
    assert theirs.eos_token_id == ids.eos == ours.eod
    assert write_tokenizer_files(str(tmp_path / "gone.json"), "HuggingFaceTokenizer",
                                 str(out)) == ([], None)


def test_from_hf_verify_failure_leaves_nothing(tmp_path, monkeypatch, capsys):
    from megalite.convert import hf_gpt2
    original = hf_gpt2.qkv_to_grouped
    monkeypatch.setattr(hf_gpt2, "qkv_to_grouped", lambda q, k, v, g: original(q, v, k, g))
    hf_random_model("classic", tmp_path / "hf")
    out = tmp_path / "ckpt"
    assert convert("from-hf", "--load", tmp_path / "hf", "--save", out, "--verify") == 2
    assert "error: --verify failed" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["hf"]


# -- bad input ------------------------------------------------------------------------------------
def test_bad_inputs_give_clear_errors(tmp_path, capsys):
    from safetensors.torch import save_file

    from megalite.checkpoint import save_checkpoint
    from megalite.distributed.parallel_state import ParallelState
    from megalite.model import get_preset
    from megalite.model.gpt import GPTModel
    from megalite.parallel.context import ModelContext

    def error_of(*argv) -> str:
        assert convert(*argv) == 2
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err, err
        return err

    missing = tmp_path / "nope"
    for cmd in ("to-hf", "from-hf", "reshard"):
        assert "no such directory" in error_of(cmd, "--load", missing, "--save", tmp_path / "o")
    assert "no megalite checkpoint there" in error_of("to-hf", "--load", tmp_path, "--save",
                                                      tmp_path / "o")
    xlnet = tmp_path / "xlnet"
    transformers.XLNetConfig(d_model=32, n_layer=1, n_head=2, d_inner=37).save_pretrained(xlnet)
    save_file({"x": torch.zeros(2)}, str(xlnet / "model.safetensors"))
    assert "unsupported Hugging Face model_type 'xlnet'" in error_of(
        "from-hf", "--load", xlnet, "--save", tmp_path / "o")
    bert = tmp_path / "bert"     # a supported type whose weights are not the config's
    transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=37).save_pretrained(bert)
    save_file({"x": torch.zeros(2)}, str(bert / "model.safetensors"))
    assert "the weights do not match the bert config" in error_of(
        "from-hf", "--load", bert, "--save", tmp_path / "o")
    hf_random_model("llama", tmp_path / "llama")
    assert "not divisible" in error_of("from-hf", "--load", tmp_path / "llama", "--save",
                                       tmp_path / "o", "--target-tensor-parallel-size", 3)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    assert "already exists and is not empty" in error_of(
        "from-hf", "--load", tmp_path / "llama", "--save", tmp_path / "full")
    # A recipe mix no Hugging Face architecture represents (rope + LayerNorm + gelu).
    cfg = get_preset("tiny").replace(position_embedding_type="rope", vocab_size=100)
    model = GPTModel(cfg, ModelContext(ParallelState.single()))
    model.init_weights(0)
    save_checkpoint(str(tmp_path / "mix"), 1, model_chunks=[model], optimizer=None, config={},
                    ps=ParallelState.single())
    assert "no exact Hugging Face counterpart" in error_of(
        "to-hf", "--load", tmp_path / "mix", "--save", tmp_path / "o")
    assert not (tmp_path / "o").exists()
    assert [p for p in os.listdir(tmp_path) if ".tmp-" in p] == []


def test_streaming_safetensors_writer_round_trips(tmp_path):
    from safetensors import safe_open

    from megalite.convert.hf_io import StreamingSafetensorsWriter
    from megalite.errors import MegaliteError
    tensors = {"b": torch.randn(3, 5).to(torch.bfloat16), "a": torch.arange(7, dtype=torch.int64),
               "e": torch.zeros(0, 4), "h": torch.randn(2, 2, 2).half(),
               "s": torch.tensor(1.5)}
    specs = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    path = str(tmp_path / "x.safetensors")
    with StreamingSafetensorsWriter(path, specs, {"k": "v"}) as w:
        for n, t in tensors.items():
            w.write(n, t)
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"k": "v"}
        assert set(f.keys()) == set(tensors)
        for n, t in tensors.items():
            assert torch.equal(f.get_tensor(n), t), n
    w = StreamingSafetensorsWriter(str(tmp_path / "y.safetensors"), specs)
    with pytest.raises(MegaliteError, match="expected b"):
        w.write("a", tensors["a"])                       # out of order
    with pytest.raises(MegaliteError, match="never written"):
        w.close()
