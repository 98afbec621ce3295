"""Mixture-of-experts loss curves across expert-parallel layouts equal the single process.

Fixed data (the built-in corpus, SentencePiece tokens), seed and a tiny LLaMA-recipe MoE model
(every layer MoE, top-2 routing, the aux loss on); 8 iterations of ``megalite train`` under
EP2, EP4, EP2 x TP2, EP2 x PP2 and EP2 x DP2 (dp 4: two expert-data-parallel replicas of each
expert), and with DeepSpeed ZeRO: EP2 with ZeRO-1 and ZeRO-2 (dense state partitioned over
dp 2, each rank's experts unpartitioned) and EP2 x DP2 with ZeRO-1 (the experts' state
partitioned over their expert-dp pair), give the single-process global-batch loss at every
iteration, with the GPT layout tests' tolerances and reasons (tests/distributed/
test_layouts.py): iteration 1 within 1e-5 relative (identical weights, only fp32 summation
orders differ), later ones within 1e-4 (AdamW magnifies ~1e-7 gradient differences of
near-zero entries).

Routing is what could break this: a token whose top-2 router probabilities nearly tie may pick
another expert when its logits are summed in another order, and the loss would jump by far
more than 1e-4. The router runs in fp32 on the same tokens in every layout (the tp ranks see
the replicated tokens; expert parallelism moves tokens only after routing), ties go to the
lower expert id, and the check below would catch a flip. Two models: no shared experts, and
Qwen-style shared experts with a sigmoid gate (the shared expert is dense: averaged over the
full dp group while the routed experts go over the expert-dp group).

Each run also reports which experts its rank held, so the test knows expert parallelism was
really on (E / ep experts per rank, the EP group holding all of them).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from harness import DistributedWorkers
from layout_common import check_curve, data_fixture, layout_results

CONFIGS = Path(__file__).resolve().parents[2] / "megalite" / "configs"
ITERS = 8
E = 4

MODELS = {
    "routed": ["--num-experts", str(E), "--moe-router-topk", "2", "--moe-ffn-hidden-size", "48",
               "--moe-aux-loss-coeff", "0.01"],
    "shared": ["--num-experts", str(E), "--moe-router-topk", "2", "--moe-ffn-hidden-size", "48",
               "--moe-aux-loss-coeff", "0.01", "--moe-shared-expert-intermediate-size", "64",
               "--moe-shared-expert-gate"],
}

# (tp, pp, ep, extra) by world size; dp = world / (tp * pp)
LAYOUTS = {
    2: [(1, 1, 2, []),                                         # EP2
        (1, 1, 2, ["--zero-stage", "1"]),                      # EP2 with ZeRO-1 (DeepSpeed)
        (1, 1, 2, ["--zero-stage", "2"])],                     # EP2 with ZeRO-2
    4: [(1, 1, 4, []),                                         # EP4
        (2, 1, 2, ["--sequence-parallel"]),                    # EP2 x TP2 (+SP)
        (1, 2, 2, []),                                         # EP2 x PP2
        (1, 1, 2, []),                                         # EP2 x DP2 (dp 4)
        (1, 1, 2, ["--zero-stage", "1"])],                     # EP2 x DP2 with ZeRO-1
}


def _argv(model: str, prefix: str, sp_model: str, tp: int, pp: int, ep: int, extra: list[str]):
    return ["--config", str(CONFIGS / "tiny-llama.yaml"), "--num-layers", "2",
            "--data-path", prefix, "--split", "98,2,0",
            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model,
            "--micro-batch-size", "2", "--global-batch-size", "8", "--seq-length", "64",
            "--train-iters", str(ITERS), "--lr", "2e-3", "--min-lr", "2e-4",
            "--lr-warmup-iters", "2", "--eval-iters", "0", "--log-interval", "100",
            "--seed", "1234", "--tensor-model-parallel-size", str(tp),
            "--pipeline-model-parallel-size", str(pp), "--expert-model-parallel-size", str(ep),
            ] + MODELS[model] + extra


def train_reporting_experts(runs: list[list[str]]) -> list[tuple[list[float], list[int]]]:
    """(loss curve, global ids of the experts this rank held) per argv (run in every worker)."""
    from megalite.training.prepare import parse_train_args
    from megalite.training.trainer import Trainer

    out = []
    for argv in runs:
        trainer = Trainer(parse_train_args(argv))
        held = sorted({int(n.split(".experts.")[1].split(".")[0])
                       for c in trainer.model_chunks for n, _ in c.named_parameters()
                       if ".experts." in n})
        out.append((trainer.train().losses, held))
    return out


data = data_fixture("corpus_token_dataset", "sp_model")


@pytest.fixture(scope="module")
def reference(data):
    prefix, sp = data
    runs = [_argv(m, prefix, sp, 1, 1, 1, []) for m in MODELS]
    results = layout_results(1, runs, timeout=900, fn=train_reporting_experts)
    for (curve, held), model in zip(results, MODELS):
        assert held == list(range(E)), model
        assert curve[-1] < curve[0] - 0.2, f"{model}: loss did not fall: {curve}"
    return {m: curve for m, (curve, _) in zip(MODELS, results)}


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("world", sorted(LAYOUTS))
def test_expert_parallel_layouts_match_single_process(world, data, reference):
    prefix, sp = data
    cases = [(m, *layout) for m in MODELS for layout in LAYOUTS[world]]
    runs = [_argv(m, prefix, sp, tp, pp, ep, extra) for m, tp, pp, ep, extra in cases]
    with DistributedWorkers(world) as workers:
        results = workers.run(train_reporting_experts, runs, timeout=1500)
    for i, (model, tp, pp, ep, extra) in enumerate(cases):
        what = f"{model} EP={ep} TP={tp} PP={pp} DP={world // (tp * pp)} {' '.join(extra)}"
        curves = [rank[i][0] for rank in results]
        assert all(c == curves[0] for c in curves), f"{what}: ranks disagree"
        check_curve(curves[0], reference[model], ITERS, what)
        for rank, per_rank in enumerate(results):
            held = per_rank[i][1]
            if not held:            # a pipeline stage without MoE layers: none here
                raise AssertionError(f"{what}: rank {rank} holds no experts")
            assert len(held) == E // ep, f"{what}: rank {rank} holds experts {held}"
