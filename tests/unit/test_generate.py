"""``megalite generate``: KV cache, sampling, Hugging Face parity and the CLI (single process).

Models are the tiny presets with init std 0.3 (instead of 0.02), so that logits spread (max
|logit| ~10) and greedy decoding walks through many different tokens instead of repeating one:
a comparison of token sequences is then sensitive. Tolerances (float32):

* cache vs. no cache: 1e-5 relative, max|cache - full| <= 1e-5 * max|full| per step (as in
  tests/distributed/test_model_tp.py). Both paths run the same kernels on the same weights; they
  differ only in how attention is batched (one query against cached keys vs. the full causal
  matrix), i.e. summation order: ~1.5e-6 relative (a few float32 ulps at |logit| ~10) measured.
* Hugging Face: 1e-4 absolute on those logits (~1e-5 relative), the bound of
  tests/integration/test_hf_parity.py (a different attention implementation and kernels).
  Token equality is meaningful only if no step is a near-tie, so the smallest top-2 logit gap
  of every step is asserted to exceed that 1e-4.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from megalite.checkpoint import save_checkpoint
from megalite.cli import main as cli_main
from megalite.config import DataConfig, TrainConfig
from megalite.distributed.parallel_state import ParallelState
from megalite.errors import MegaliteError
from megalite.generate import build_parser, continuation_text, generate_text
from megalite.inference import (KVCache, SamplingConfig, filter_logits, generate_tokens,
                                sample_next)
from megalite.model import get_preset
from megalite.model.gpt import GPTModel
from megalite.parallel.context import ModelContext

CACHE_TOL = 1e-5
HF_TOL = 1e-4
NEW = 16

RECIPES = {
    # classic: learned positions, LayerNorm, GELU, biases, tied output layer
    "classic": get_preset("tiny").replace(init_method_std=0.3, vocab_size=500),
    "classic-sinusoidal": get_preset("tiny").replace(init_method_std=0.3, vocab_size=500,
                                                     position_embedding_type="sinusoidal"),
    # LLaMA: RoPE, RMSNorm, SwiGLU, 8 query heads reading 2 key/value groups, untied
    "llama-gqa": get_preset("tiny-llama").replace(init_method_std=0.3, vocab_size=500,
                                                  num_attention_heads=8, num_query_groups=2),
}


def build(cfg, seed=3):
    model = GPTModel(cfg, ModelContext(ParallelState.single())).eval()
    model.init_weights(seed)
    return model


def prompt_ids(batch, length, vocab=500, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def min_top2_gap(logits_steps):
    return min((l.topk(2, dim=-1).values.diff(dim=-1).abs().min().item() for l in logits_steps))


# ---- KV cache -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(RECIPES))
def test_cache_equals_full_recompute(name):
    model = build(RECIPES[name])
    prompt = prompt_ids(2, 9)
    cached = generate_tokens(model, prompt, NEW, SamplingConfig(), keep_logits=True)
    full = generate_tokens(model, prompt, NEW, SamplingConfig(), keep_logits=True,
                           use_cache=False)
    assert cached.tokens.shape == (2, NEW)
    assert torch.equal(cached.tokens, full.tokens)
    assert len(set(cached.tokens.flatten().tolist())) > NEW // 2    # not a degenerate repeat
    for step, (a, b) in enumerate(zip(cached.logits, full.logits)):
        assert a.shape == (2, 500)
        err, scale = (a - b).abs().max().item(), b.abs().max().item()
        assert scale > 1.0                                          # spread logits
        assert err <= CACHE_TOL * scale, f"step {step}: max |cache - full| = {err} (scale {scale})"


@pytest.mark.parametrize("name", ["classic", "llama-gqa"])
def test_chunked_prefill_matches_single_forward(name):
    """Several new tokens after cached ones (the offset causal mask) give the same logits as
    one forward over the whole sequence, and the cache advances by every chunk."""
    model = build(RECIPES[name])
    ids = prompt_ids(1, 20)
    with torch.no_grad():
        ref = model(ids)
        cache = KVCache.for_model(model, 1, 20)
        parts = [model(ids[:, a:b], kv_cache=cache) for a, b in ((0, 7), (7, 8), (8, 20))]
    assert cache.offset == 20
    err = (torch.cat(parts, dim=1) - ref).abs().max().item()
    assert err <= CACHE_TOL * ref.abs().max().item()


def test_cache_refuses_overflow():
    model = build(RECIPES["llama-gqa"])
    cache = KVCache.for_model(model, 1, 8)
    with torch.no_grad():
        model(prompt_ids(1, 6), kv_cache=cache)
        with pytest.raises(MegaliteError, match="KV cache holds 8 positions"):
            model(prompt_ids(1, 3), kv_cache=cache)
    with pytest.raises(MegaliteError, match="max_position_embeddings"):
        KVCache.for_model(model, 1, 129)


# ---- Hugging Face parity --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama-gqa", "classic"])
def test_hf_generate_greedy_parity(name):
    transformers = pytest.importorskip("transformers")
    from megalite.convert import config_to_hf, to_hf

    cfg = RECIPES[name]
    model = build(cfg)
    hf_cfg = config_to_hf(cfg)
    hf_cfg._attn_implementation = "eager"       # an independent attention implementation
    cls = (transformers.LlamaForCausalLM if hf_cfg.model_type == "llama"
           else transformers.GPT2LMHeadModel)
    hf = cls(hf_cfg).eval()
    hf.load_state_dict(to_hf(model.full_state_dict(), cfg), strict=True)
    hf.generation_config.eos_token_id = None     # run all NEW steps
    hf.generation_config.pad_token_id = 0
    prompt = prompt_ids(1, 9)
    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                      max_new_tokens=NEW, output_scores=True, return_dict_in_generate=True)
    ours = generate_tokens(model, prompt, NEW, SamplingConfig(), keep_logits=True)
    assert min_top2_gap(ours.logits) > HF_TOL      # no step is a near-tie
    assert out.sequences[0, 9:].tolist() == ours.tokens[0].tolist()
    for step, (hf_scores, mine) in enumerate(zip(out.scores, ours.logits)):
        err = (hf_scores.float() - mine).abs().max().item()
        assert err <= HF_TOL, f"step {step}: max |HF - megalite| = {err}"


# ---- sampling -------------------------------------------------------------------------------
def test_top_k_1_equals_greedy():
    model = build(RECIPES["llama-gqa"])
    prompt = prompt_ids(2, 5)
    greedy = generate_tokens(model, prompt, NEW, SamplingConfig())
    top1 = generate_tokens(model, prompt, NEW,
                           SamplingConfig(greedy=False, temperature=1.7, top_k=1),
                           generator=torch.Generator().manual_seed(5))
    assert torch.equal(greedy.tokens, top1.tokens)


def test_sampling_reproducible_with_seed_and_differs_from_greedy():
    model = build(RECIPES["classic"])
    prompt = prompt_ids(1, 5)
    cfg = SamplingConfig(greedy=False, temperature=1.0, top_k=50, top_p=0.9)

    def run(seed):
        return generate_tokens(model, prompt, NEW, cfg,
                               generator=torch.Generator().manual_seed(seed)).tokens

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))
    assert not torch.equal(run(7), generate_tokens(model, prompt, NEW, SamplingConfig()).tokens)


def _nucleus_reference(logits_row: list[float], top_k: int, top_p: float) -> set[int]:
    """Allowed token ids computed in plain Python (float64), independently of the code."""
    import math
    order = sorted(range(len(logits_row)), key=lambda i: -logits_row[i])
    if top_k:
        order = order[:top_k]
    m = max(logits_row[i] for i in order)
    weights = [math.exp(logits_row[i] - m) for i in order]
    total = sum(weights)
    allowed, mass = set(), 0.0
    for i, w in zip(order, weights):
        if mass >= top_p:
            break
        allowed.add(i)
        mass += w / total
    return allowed


@pytest.mark.parametrize("top_k,top_p,temperature", [(5, 1.0, 1.0), (0, 0.6, 1.0),
                                                      (20, 0.8, 0.7), (0, 0.3, 2.0)])
def test_samples_stay_inside_top_k_and_nucleus(top_k, top_p, temperature):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 64, generator=gen) * 2.0
    cfg = SamplingConfig(greedy=False, temperature=temperature, top_k=top_k, top_p=top_p)
    scaled = (logits / temperature).tolist()
    allowed = [_nucleus_reference(row, top_k, top_p) for row in scaled]
    # the reference sets are proper subsets, so escaping them would be noticed
    assert all(1 <= len(a) < 64 for a in allowed)
    kept = filter_logits(logits / temperature, top_k, top_p)
    for row, a in zip(kept, allowed):
        assert set(torch.nonzero(torch.isfinite(row)).flatten().tolist()) == a
    seen = [set() for _ in range(4)]
    for _ in range(100):
        for r, t in enumerate(sample_next(logits, cfg, gen).tolist()):
            assert t in allowed[r]
            seen[r].add(t)
    assert any(len(s) > 1 for s in seen)      # it really samples


def test_sampling_config_rejects_bad_values():
    for kw, flag in ((dict(temperature=0.0), "--temperature"), (dict(top_k=-1), "--top-k"),
                     (dict(top_p=0.0), "--top-p"), (dict(top_p=1.5), "--top-p")):
        with pytest.raises(MegaliteError, match=flag):
            SamplingConfig(greedy=False, **kw)


def test_stops_at_eod():
    model = build(RECIPES["llama-gqa"])
    prompt = prompt_ids(1, 5)
    free = generate_tokens(model, prompt, NEW, SamplingConfig()).tokens[0].tolist()
    eod = free[3]                                # pretend the 4th generated token ends documents
    first = free.index(eod)
    out = generate_tokens(model, prompt, NEW, SamplingConfig(), eod=eod)
    assert out.tokens[0].tolist() == free[:first + 1]
    assert bool(out.finished[0])


# ---- the CLI ----------------------------------------------------------------------------------
def save_tiny_checkpoint(directory, cfg, data: DataConfig, seed=3) -> None:
    model = GPTModel(cfg, ModelContext(ParallelState.single()))
    model.init_weights(seed)
    save_checkpoint(str(directory), 5, model_chunks=[model], optimizer=None,
                    config=TrainConfig(model=cfg, data=data), ps=ParallelState.single())


SP_CFG = get_preset("tiny-llama").replace(init_method_std=0.3)      # vocab 1000 = sp_model's


@pytest.fixture(scope="module")
def sp_checkpoint(sp_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("gen_ckpt")
    save_tiny_checkpoint(d, SP_CFG, DataConfig(tokenizer_type="SentencePieceTokenizer",
                                               tokenizer_model=sp_model))
    return str(d)


def test_cli_prints_greedy_continuation(sp_checkpoint):
    argv = ["--load", sp_checkpoint, "--prompt", "The os module provides", "--max-new-tokens",
            "12", "--greedy"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "megalite", "generate", *argv],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # the same continuation, computed in this process from the same checkpoint
    new_ids, text = generate_text(build_parser().parse_args(argv), ParallelState.single())
    assert len(new_ids) >= 1 and text.strip()
    assert proc.stdout == text + "\n"


def test_continuation_keeps_the_space_at_the_seam(sp_model):
    from megalite.data.tokenizers import build_tokenizer
    tok = build_tokenizer("SentencePieceTokenizer", sp_model)
    ids = tok.encode("import os and sys")
    cut = len(tok.encode("import os"))
    assert continuation_text(tok, ids[:cut], ids[cut:]) == " and sys"


def _cli(capsys, *argv):
    rc = cli_main(["generate", *argv])
    return rc, capsys.readouterr()


def test_cli_sampling_flags_and_empty_prompt(sp_checkpoint, capsys):
    args = ["--load", sp_checkpoint, "--max-new-tokens", "10", "--temperature", "0.8",
            "--top-k", "40", "--top-p", "0.9", "--seed", "3"]
    rc1, out1 = _cli(capsys, *args, "--prompt", "")
    rc2, out2 = _cli(capsys, *args, "--prompt", "")
    assert rc1 == rc2 == 0 and out1.out == out2.out and out1.out.strip()
    rc, out = _cli(capsys, "--load", sp_checkpoint, "--prompt", "x", "--greedy", "--top-k", "3")
    assert rc == 2 and "error: --greedy cannot be combined with --top-k" in out.err


def test_cli_bad_inputs(sp_checkpoint, sp_model, tmp_path, capsys):
    missing = tmp_path / "empty"
    missing.mkdir()
    rc, out = _cli(capsys, "--load", str(missing), "--prompt", "x")
    assert rc == 2 and out.err.startswith("error: no checkpoint found in") and not out.out

    rc, out = _cli(capsys, "--load", str(tmp_path / "nope"), "--prompt", "x")
    assert rc == 2 and "error: --load" in out.err and "no such directory" in out.err

    mock = tmp_path / "mock"
    save_tiny_checkpoint(mock, SP_CFG, DataConfig(mock_data=True))
    rc, out = _cli(capsys, "--load", str(mock), "--prompt", "x")
    assert rc == 2 and "names no tokenizer" in out.err and "--tokenizer-type" in out.err
    rc, out = _cli(capsys, "--load", str(mock), "--prompt", "x", "--max-new-tokens", "3",
                   "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model)
    assert rc == 0 and out.out.strip()           # the flags stand in for the missing tokenizer

    long_prompt = " ".join(["attribute"] * 200)   # > 128 positions
    rc, out = _cli(capsys, "--load", sp_checkpoint, "--prompt", long_prompt)
    assert rc == 2 and "max_position_embeddings=128" in out.err

    rc, out = _cli(capsys, "--load", sp_checkpoint, "--prompt", "x",
                   "--tensor-model-parallel-size", "3")
    assert rc == 2 and "num_attention_heads=4 is not divisible by 3" in out.err

    rc, out = _cli(capsys, "--load", sp_checkpoint, "--prompt", "x",
                   "--tensor-model-parallel-size", "2")      # heads divide, but one process
    assert rc == 2 and "needs a multiple of 2 processes, got 1" in out.err

    # under srun the world size comes from SLURM's variables (WORLD_SIZE is not set yet)
    step = {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "3",
            "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "n1",
            "SLURM_STEP_NODELIST": "n1"}
    with pytest.MonkeyPatch.context() as mp:
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            mp.delenv(k, raising=False)
        for k, v in step.items():
            mp.setenv(k, v)
        rc, out = _cli(capsys, "--load", sp_checkpoint, "--prompt", "x",
                       "--tensor-model-parallel-size", "2")
    assert rc == 2 and "needs a multiple of 2 processes, got 3" in out.err

    rc, out = _cli(capsys, "--load", sp_checkpoint, "--prompt", "x", "--iteration", "99")
    assert rc == 2 and "no checkpoint for iteration 99" in out.err

    rc, out = _cli(capsys, "--load", sp_checkpoint, "--prompt", "x", "--top-p", "0")
    assert rc == 2 and "--top-p" in out.err

    rc, out = _cli(capsys, "--load", sp_checkpoint)
    assert rc == 2 and "--prompt" in out.err


def test_cli_error_in_a_subprocess(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "megalite", "generate", "--load",
                           str(tmp_path), "--prompt", "x"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: no checkpoint found in")
    assert "Traceback" not in proc.stderr


# ---- the tokenizer's vocabulary bounds every generated id (issue 10) -------------------------
def _seeded(seed=0):
    return torch.Generator().manual_seed(seed)


HOT = SamplingConfig(greedy=False, temperature=3.0)     # flat: ids all over the vocabulary


def test_vocab_size_bounds_greedy_and_sampled_ids():
    model = build(RECIPES["llama-gqa"])                  # vocab 500
    prompt = prompt_ids(1, 5)
    for sampling in (SamplingConfig(), HOT):
        free = generate_tokens(model, prompt, 32, sampling, generator=_seeded())
        assert int(free.tokens.max()) >= 250             # unbounded, ids past 250 do come up
        out = generate_tokens(model, prompt, 32, sampling, generator=_seeded(), vocab_size=250,
                              keep_logits=True)
        assert out.tokens.shape == (1, 32) and int(out.tokens.max()) < 250
        assert all(step.shape == (1, 250) for step in out.logits)
        if sampling.greedy:                              # the best of the allowed ids
            assert out.tokens[0].tolist() == [int(step.argmax()) for step in out.logits]
    for kwargs, match in ((dict(vocab_size=0), r"vocab_size=0 must be in \[1, 500\]"),
                          (dict(vocab_size=501), r"vocab_size=501 must be in \[1, 500\]"),
                          (dict(vocab_size=250, eod=300), r"eod=300 is outside the vocabulary")):
        with pytest.raises(MegaliteError, match=match):
            generate_tokens(model, prompt, 4, SamplingConfig(), **kwargs)
    with pytest.raises(MegaliteError, match=r"prompt ids must be in \[0, 500\)"):
        generate_tokens(model, torch.tensor([[1, 500]]), 4, SamplingConfig())


def test_padding_columns_are_never_chosen():
    model = build(RECIPES["llama-gqa"])                  # vocab 500, padded to 512
    assert model.output_layer.weight.shape[0] == 512
    with torch.no_grad():                                # padding rows far ahead of the rest
        model.output_layer.weight[500:] = 100 * model.output_layer.weight[:12].abs()
    for sampling in (SamplingConfig(), HOT):
        out = generate_tokens(model, prompt_ids(1, 5), 16, sampling, generator=_seeded())
        assert int(out.tokens.max()) < 500


def test_cli_tokenizer_smaller_than_the_model(sp_model, hf_tokenizer_json, sp_checkpoint,
                                              tmp_path, capsys):
    sp = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model]
    modes = (["--greedy"], ["--temperature", "3.0", "--seed", "5"])
    # Trained with --vocab-size 1200 and its 1000-token tokenizer: accepted, and no id past
    # 1000 is generated (this model's unbounded greedy run does produce some).
    wide_cfg = SP_CFG.replace(vocab_size=1200)
    wide = tmp_path / "wide"
    save_tiny_checkpoint(wide, wide_cfg, DataConfig(tokenizer_type="SentencePieceTokenizer",
                                                    tokenizer_model=sp_model))
    free = generate_tokens(build(wide_cfg), torch.tensor([[5, 6, 7]]), 24, SamplingConfig())
    assert int(free.tokens.max()) >= 1000
    for mode in modes:
        for flags in ([], sp):                           # its own tokenizer, saved or flagged
            argv = ["--load", str(wide), "--prompt", "", "--max-new-tokens", "24", *mode, *flags]
            new_ids, _ = generate_text(build_parser().parse_args(argv), ParallelState.single())
            assert new_ids and max(new_ids) < 1000
            rc, out = _cli(capsys, *argv)
            assert rc == 0 and out.out.strip(), out.err
    # Another tokenizer than the checkpoint's (a 2000-token one), smaller than the model: refused.
    hf_ckpt = tmp_path / "hf"
    save_tiny_checkpoint(hf_ckpt, SP_CFG.replace(vocab_size=2000), DataConfig(
        tokenizer_type="HuggingFaceTokenizer", tokenizer_model=hf_tokenizer_json))
    mock = tmp_path / "mock"
    save_tiny_checkpoint(mock, wide_cfg, DataConfig(mock_data=True))
    for mode in modes:
        rc, out = _cli(capsys, "--load", str(hf_ckpt), "--prompt", "x", *mode, *sp)
        assert rc == 2 and not out.out
        assert (f"error: the tokenizer (--tokenizer-model {sp_model}) has 1000 tokens, the "
                f"model's vocabulary 2000 (vocab_size in the checkpoint's config, before "
                f"padding): the checkpoint's own tokenizer (--tokenizer-model "
                f"{hf_tokenizer_json}) has 2000;") in out.err, out.err
        rc, out = _cli(capsys, "--load", str(mock), "--prompt", "x", *mode, *sp)
        assert rc == 2 and "has 1000 tokens, the model's vocabulary 1200" in out.err
        assert "the checkpoint names no tokenizer to confirm" in out.err
    # Larger than the model: refused as well.
    rc, out = _cli(capsys, "--load", sp_checkpoint, "--prompt", "x", "--tokenizer-type",
                   "HuggingFaceTokenizer", "--tokenizer-model", hf_tokenizer_json)
    assert rc == 2 and (f"the tokenizer (--tokenizer-model {hf_tokenizer_json}) has 2000 tokens, "
                        f"the model's vocabulary 1000") in out.err
    assert "not the tokenizer this checkpoint was trained with" in out.err
