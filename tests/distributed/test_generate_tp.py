"""``megalite generate`` under tensor parallelism: the same checkpoint gives the same tokens at
TP=1 and TP=2 (real gloo process groups), whichever layout (TP=1, TP=2, PP=2) saved it.

Each TP=2 rank holds half the heads, half the KV cache and half the vocabulary; the logits are
all-gathered and the token broadcast from tp rank 0. Tensor parallelism only changes summation
order (~1e-6 relative on the logits, see tests/distributed/test_model_tp.py), so greedy tokens
must agree exactly (the models below have top-2 logit gaps far above that), and so must tokens
sampled from an equally seeded generator, which reads the same probabilities up to that rounding.
Both recipes: classic (learned positions, tied output) and LLaMA (RoPE, GQA 4 heads / 2 groups).
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from harness import DistributedWorkers

from megalite.checkpoint import save_checkpoint
from megalite.config import DataConfig, TrainConfig
from megalite.distributed.parallel_state import ParallelState
from megalite.generate import build_parser, generate_text
from megalite.model import get_preset
from megalite.model.gpt import GPTModel
from megalite.parallel.context import ModelContext

RECIPES = {  # vocab 1000 = the sp_model fixture's; init std 0.3 for spread logits
    "classic": get_preset("tiny").replace(init_method_std=0.3),
    "llama-gqa": get_preset("tiny-llama").replace(init_method_std=0.3),
}
PROMPT = "The os module provides"


def argv_for(ckpt, sampled):
    argv = ["--load", ckpt, "--prompt", PROMPT, "--max-new-tokens", "16"]
    return argv + (["--temperature", "0.9", "--top-k", "50", "--top-p", "0.95", "--seed", "11"]
                   if sampled else ["--greedy"])


def save(directory, cfg, tokenizer_model, ps):
    """Collective: save a freshly initialized model (the same full weights in every layout;
    with pp = 2 each stage holds one of the two layers)."""
    half = cfg.num_layers // 2
    kw = ({} if ps.pp_size == 1 else
          dict(pre_process=ps.pp_rank == 0, post_process=ps.pp_rank == 1,
               layer_range=(0, half) if ps.pp_rank == 0 else (half, cfg.num_layers)))
    model = GPTModel(cfg, ModelContext(ps), **kw)
    model.init_weights(3)
    save_checkpoint(directory, 1, model_chunks=[model], optimizer=None, ps=ps,
                    config=TrainConfig(model=cfg, data=DataConfig(
                        tokenizer_type="SentencePieceTokenizer", tokenizer_model=tokenizer_model)))


def tp2_worker(tp1_ckpts: dict, tp2_dirs: dict, pp2_dirs: dict, tokenizer_model: str):
    """On each of 2 ranks: generate from the TP=1 checkpoints at TP=2, and save TP=2 and PP=2
    ones."""
    ps = ParallelState.build(tensor_model_parallel_size=2)
    ps_pp = ParallelState.build(tensor_model_parallel_size=1, pipeline_model_parallel_size=2)
    out = {}
    for name, ckpt in tp1_ckpts.items():
        for sampled in (False, True):
            out[name, sampled] = generate_text(build_parser().parse_args(argv_for(ckpt, sampled)),
                                               ps)
        save(tp2_dirs[name], RECIPES[name], tokenizer_model, ps)
        save(pp2_dirs[name], RECIPES[name], tokenizer_model, ps_pp)
    return out


@pytest.fixture(scope="module")
def workers():
    with DistributedWorkers(2) as w:
        yield w


def test_same_tokens_at_tp1_and_tp2(workers, sp_model, tmp_path):
    tp1 = {n: str(tmp_path / f"{n}-tp1") for n in RECIPES}
    tp2 = {n: str(tmp_path / f"{n}-tp2") for n in RECIPES}
    pp2 = {n: str(tmp_path / f"{n}-pp2") for n in RECIPES}
    single = ParallelState.single()
    for name, cfg in RECIPES.items():
        save(tp1[name], cfg, sp_model, single)
    rank0, rank1 = workers.run(tp2_worker, tp1, tp2, pp2, sp_model)
    assert rank0 == rank1                       # the tp ranks agree on every token
    for name in RECIPES:
        for sampled in (False, True):
            ids_tp1, text_tp1 = generate_text(
                build_parser().parse_args(argv_for(tp1[name], sampled)), single)
            assert len(ids_tp1) >= 8            # something to compare
            assert rank0[name, sampled] == (ids_tp1, text_tp1), (name, sampled)
            # the checkpoints saved at TP=2 and at PP=2, loaded into a TP=1 model
            for other in (tp2[name], pp2[name]):
                assert generate_text(build_parser().parse_args(argv_for(other, sampled)),
                                     single) == (ids_tp1, text_tp1), (name, sampled, other)
        greedy, sampled_ = rank0[name, False][0], rank0[name, True][0]
        assert greedy != sampled_               # sampling really sampled


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_cli_under_torchrun(sp_model, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    save(ckpt, RECIPES["llama-gqa"], sp_model, ParallelState.single())
    argv = argv_for(ckpt, sampled=False)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(["torchrun", "--standalone", "--nproc-per-node", "2",
                           "-m", "megalite", "generate", *argv,
                           "--tensor-model-parallel-size", "2"],
                          capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, text = generate_text(build_parser().parse_args(argv), ParallelState.single())
    assert proc.stdout == text + "\n"           # printed once (rank 0), the TP=1 continuation
