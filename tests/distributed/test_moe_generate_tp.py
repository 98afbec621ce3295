"""``megalite generate`` of MoE checkpoints converted from Hugging Face: at TP=1 and at TP=2
(real gloo process groups) it prints the tokens ``transformers``' greedy ``generate`` gives.

Two models (hf_common.hf_moe_config, vocabulary 1000 = the sp_model fixture's): Qwen3-MoE
(query/key norms, renormalised top-3 of 6 experts, a dense middle layer) and Qwen2-MoE (a gated
shared expert, pre-softmax weights). At TP=2 each rank holds half the heads and half of every
expert's width; the router, the shared expert's gate and the query/key norms are replicated, and
the routing is computed from the same fp32 logits on both ranks (model/moe.py), so the tokens
go to the same experts as in one process. Tensor parallelism only changes the summation order
(~1e-6 relative on the O(1) logits, tests/distributed/test_model_tp.py), far below the top-2
logit gaps of these random models, so the greedy tokens must be equal, not close. Greedy
decoding stops at the tokenizer's end-of-document id (megalite) or after the 16 new tokens
(HF, eos unset): HF's tokens are compared up to the first end-of-document id.
"""
from __future__ import annotations

import pytest

from harness import DistributedWorkers
from hf_common import hf_moe_model

from megalite.cli import main as megalite_main
from megalite.distributed.parallel_state import ParallelState
from megalite.generate import build_parser, generate_text

KINDS = ("qwen3_moe_norm", "qwen2_moe")
PROMPT = "The os module provides"
NEW = 16


def argv_for(ckpt: str, sp_model: str) -> list[str]:
    return ["--load", ckpt, "--prompt", PROMPT, "--max-new-tokens", str(NEW), "--greedy",
            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model]


def tp2_worker(ckpts: dict, sp_model: str) -> dict:
    """On each of 2 ranks: generate from every checkpoint at TP=2."""
    ps = ParallelState.build(tensor_model_parallel_size=2)
    return {kind: generate_text(build_parser().parse_args(argv_for(ckpt, sp_model)), ps)
            for kind, ckpt in ckpts.items()}


def hf_greedy(hf, tokenizer) -> list[int]:
    """transformers' greedy continuation of PROMPT, cut at the first end-of-document id."""
    import torch
    prompt = torch.tensor([tokenizer.encode(PROMPT)])
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                          max_new_tokens=NEW)
    new = out[0, prompt.shape[1]:].tolist()
    return new[:new.index(tokenizer.eod)] if tokenizer.eod in new else new


@pytest.fixture(scope="module")
def workers():
    with DistributedWorkers(2) as w:
        yield w


def test_moe_generation_at_tp2_equals_tp1_and_transformers(workers, sp_model, tmp_path):
    from megalite.data.tokenizers import build_tokenizer
    tokenizer = build_tokenizer("SentencePieceTokenizer", sp_model)
    ckpts, expected = {}, {}
    for kind in KINDS:
        hf = hf_moe_model(kind, tmp_path / f"{kind}-hf", tokenizer.vocab_size)
        ckpts[kind] = str(tmp_path / f"{kind}-ckpt")
        assert megalite_main(["convert", "from-hf", "--load", str(tmp_path / f"{kind}-hf"),
                              "--save", ckpts[kind]]) == 0
        expected[kind] = hf_greedy(hf, tokenizer)
        assert len(expected[kind]) >= 8, (kind, expected[kind])   # something to compare
    rank0, rank1 = workers.run(tp2_worker, ckpts, sp_model)
    assert rank0 == rank1                       # the tp ranks agree on every token
    for kind in KINDS:
        tp1 = generate_text(build_parser().parse_args(argv_for(ckpts[kind], sp_model)),
                            ParallelState.single())
        assert tp1[0] == expected[kind], kind
        assert rank0[kind] == tp1, kind         # ids and text
