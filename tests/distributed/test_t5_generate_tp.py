"""``megalite generate`` for T5 under tensor parallelism (real gloo process groups): the prompt is
the encoder input, the decoder decodes with a KV cache, and greedy decoding gives exactly the
tokens of transformers' ``generate`` on the same checkpoint, at TP=1 and at TP=2; sampled
tokens agree between TP=1 and TP=2 (an equally seeded generator over the same probabilities).

The checkpoints come from ``megalite convert from-hf`` of Hub-like T5 directories
(hf_common.write_hf_t5_dir, v1.0 and v1.1), saved at TP=2 and loaded at both sizes. Tensor
parallelism only changes summation order (~1e-6 relative on the logits); the greedy steps'
top-2 logit gaps are asserted to exceed 1e-4, so equal tokens are a real check.
"""
from __future__ import annotations

import pytest
import torch
import transformers
from harness import DistributedWorkers
from hf_common import write_hf_t5_dir

from megalite.cli import main as megalite_main
from megalite.distributed.parallel_state import ParallelState
from megalite.generate import build_parser, generate_text

PROMPT = "The os module provides a portable way of using operating system functionality"
VERSIONS = ("v1.0", "v1.1")


def argv_for(ckpt, sampled):
    argv = ["--load", ckpt, "--prompt", PROMPT, "--max-new-tokens", "24"]
    return argv + (["--temperature", "0.9", "--top-k", "50", "--seed", "11"] if sampled
                   else ["--greedy"])


def tp2_worker(ckpts: dict):
    ps = ParallelState.build(tensor_model_parallel_size=2)
    return {(v, sampled): generate_text(build_parser().parse_args(argv_for(ckpt, sampled)), ps)
            for v, ckpt in ckpts.items() for sampled in (False, True)}


@pytest.fixture(scope="module")
def checkpoints(t5_spiece_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("t5gen")
    out = {}
    for version in VERSIONS:
        hf_dir = write_hf_t5_dir(root / f"hf-{version}", version, t5_spiece_model, seed=4)
        ckpt = root / f"ckpt-{version}"
        assert megalite_main(["convert", "from-hf", "--load", hf_dir, "--save", str(ckpt),
                              "--target-tensor-parallel-size", "2"]) == 0
        out[version] = (hf_dir, str(ckpt))
    return out


def test_greedy_equals_transformers_at_tp1_and_tp2(checkpoints):
    with DistributedWorkers(2) as workers:
        rank0, rank1 = workers.run(tp2_worker, {v: c for v, (_, c) in checkpoints.items()})
    assert rank0 == rank1                               # the tp ranks agree on every token
    single = ParallelState.single()
    from megalite.data.tokenizers import build_tokenizer
    for version, (hf_dir, ckpt) in checkpoints.items():
        tok = build_tokenizer("SentencePieceTokenizer", f"{hf_dir}/spiece.model")
        hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(hf_dir).eval()
        source = torch.tensor([tok.encode(PROMPT)])
        with torch.no_grad():
            out = hf.generate(input_ids=source, max_new_tokens=24, do_sample=False,
                              num_beams=1, output_scores=True, return_dict_in_generate=True)
        theirs = out.sequences[0, 1:].tolist()          # after the decoder start id
        if 1 in theirs:
            theirs = theirs[:theirs.index(1)]           # up to the eos
        gaps = [s.topk(2).values[0] for s in out.scores]
        assert min((g[0] - g[1]).item() for g in gaps) > 1e-4
        for sampled in (False, True):
            ids, text = generate_text(build_parser().parse_args(argv_for(ckpt, sampled)), single)
            assert rank0[version, sampled] == (ids, text), (version, sampled)
            if not sampled:
                assert len(ids) >= 8 and ids == theirs, version
        assert rank0[version, True][0] != rank0[version, False][0]   # sampling sampled
