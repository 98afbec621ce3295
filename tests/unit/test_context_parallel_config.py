"""Context parallelism without processes: the rank layout (TP < CP < DP < PP), the start-up
refusals (one line naming the flag), the dry run's per-rank activation memory (1/CP), the data
path's slicing and generation's refusal."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from megalite.cli import main
from megalite.distributed.parallel_state import ParallelState, rank_layout
from megalite.errors import MegaliteError
from megalite.parallel.context_parallel import local_indices, local_microbatch
from megalite.training.dry_run import plan_run
from megalite.training.prepare import parse_train_args

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "megalite", "configs")
GPT, BERT = os.path.join(CONFIGS, "tiny-gpt.yaml"), os.path.join(CONFIGS, "tiny-bert.yaml")


def _config(*extra, config=GPT):
    return parse_train_args(["--config", config, "--mock-data", *extra])


def test_rank_layout_orders_tp_cp_dp_pp():
    lay = rank_layout(16, 2, 2, 2)                     # tp 2, pp 2, cp 2 -> dp 2
    assert (lay.tp_size, lay.cp_size, lay.dp_size, lay.pp_size) == (2, 2, 2, 2)
    assert lay.tp_groups[:2] == ((0, 1), (2, 3))
    assert lay.cp_groups[:2] == ((0, 2), (1, 3))        # tp stride apart
    assert lay.dp_groups[:2] == ((0, 4), (1, 5))        # tp * cp stride apart
    assert lay.pp_groups[0] == (0, 8)
    for r in range(16):
        t, d, p = lay.coordinates(r)
        assert lay.rank_of(t, d, p, lay.cp_rank_of(r)) == r
    assert lay.mp_groups[0] == (0, 1, 8, 9)             # tp x pp at one (dp, cp)
    assert rank_layout(8, 2, 2).cp_groups == tuple((r,) for r in range(8))   # cp 1: as before
    with pytest.raises(MegaliteError, match="not divisible by --tensor-model-parallel-size 2 "
                                            "x --context-parallel-size 2"):
        rank_layout(6, 2, 1, 2)
    with pytest.raises(MegaliteError, match="expert and context parallelism together are not "
                                            "implemented"):
        rank_layout(8, 1, 1, 2, 2)


@pytest.mark.parametrize("args,message", [
    (["--context-parallel-size", "3"], "--seq-length 64 is not divisible by 2 x 3"),
    (["--context-parallel-size", "2", "--attention-dropout", "0.1"], "attention dropout"),
    (["--context-parallel-size", "2", "--zero-stage", "3"], "--zero-stage 3"),
    (["--context-parallel-size", "0"], "context_parallel_size"),
])
def test_refusals(args, message):
    with pytest.raises(MegaliteError, match=message):
        _config(*args)


def test_bert_refused():
    with pytest.raises(MegaliteError, match="implemented for GPT only"):
        _config("--context-parallel-size", "2", config=BERT)


def test_cli_refusal_is_one_line(capsys):
    assert main(["train", "--config", GPT, "--mock-data", "--context-parallel-size", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--context-parallel-size 3" in err[0], err


def test_dry_run_divides_activations_by_cp(capsys):
    one = plan_run(_config(), 4).stages[0].memory_bytes
    cp4 = plan_run(_config("--context-parallel-size", "4"), 4).stages[0].memory_bytes
    assert cp4["activations"] == one["activations"] / 4
    assert cp4["logits"] == one["logits"] / 4
    assert cp4["weights"] == one["weights"]             # weights are not split by CP
    with pytest.raises(MegaliteError, match="world size 6 is not divisible"):
        plan_run(_config("--context-parallel-size", "4"), 6)
    assert main(["train", "--config", GPT, "--mock-data", "--dry-run", "--world-size", "8",
                 "--context-parallel-size", "2", "--tensor-model-parallel-size", "2"]) == 0
    assert "8 process(es) = TP 2 x CP 2 x PP 1 x DP 2" in capsys.readouterr().out


def test_local_microbatch_slices_per_token_fields():
    ps = dataclasses.replace(ParallelState.single(), cp_size=2, cp_rank=1)
    tokens = torch.arange(16).view(2, 8)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0
    local = local_microbatch({"tokens": tokens, "labels": tokens + 1, "loss_mask": mask,
                              "flag": torch.zeros(2)}, 8, ps)
    idx = local_indices(8, 2, 1)                         # chunks 1 and 2 of 4: tokens 2..5
    assert idx.tolist() == [2, 3, 4, 5]
    assert torch.equal(local["tokens"], tokens[:, idx])
    assert torch.equal(local["labels"], tokens[:, idx] + 1)
    assert torch.equal(local["flag"], torch.zeros(2))    # not a per-token field: as it is
    # each rank's share of the whole count of loss tokens (5 + 8) / cp
    assert local["loss_denominator"].tolist() == [2.5, 4.0]


def test_generation_refused_under_cp():
    from megalite.inference.kv_cache import KVCache
    from megalite.model.gpt import GPTModel
    from megalite.parallel.context import ModelContext

    cfg = _config().model
    ps = dataclasses.replace(ParallelState.single(), cp_size=2)
    model = GPTModel(cfg, ModelContext(ps))
    model.init_weights(1)
    with pytest.raises(MegaliteError, match="generation with --context-parallel-size"):
        model(torch.zeros(1, 4, dtype=torch.long), kv_cache=KVCache.for_model(model, 1, 16))
