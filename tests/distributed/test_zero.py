"""DeepSpeed ZeRO-1/2/3 train exactly like megalite's own Optimizer at DP=1 on the same global
batch; optimizer-state memory per rank falls as 1/DP; a same-layout resume is bitwise; settings
DeepSpeed/megalite cannot run are refused at start-up with a clear error.

Layouts (real gloo groups, the real pipeline schedule through ``train`` of
test_optimizer_dist.py): ZeRO-1/2/3 at DP=2; ZeRO-1 at TP=2 x DP=2; ZeRO-2 at TP=2 x DP=2 with
sequence parallelism; ZeRO-1 at PP=2 x DP=2 with a tied embedding (its last-stage copy must not be
counted twice in DeepSpeed's norm, and must stay equal to the first stage's), also interleaved
(2 virtual stages, 4 layers). bf16 ZeRO-2 and ZeRO-3 at DP=2 against megalite's bf16 Optimizer at DP=1.

Tolerance: 1e-5 relative on losses and norms, 5e-5 of a tensor's max on parameters, fp32 (see
test_optimizer_dist.py: the same sums in another order --
DeepSpeed's reduce-scatter over two replicas, tensor-parallel partial sums, and DeepSpeed's clip
``g / ((n + 1e-6) / c)`` vs torch's ``g * (c / (n + 1e-6))`` -- move results by float32 ulps;
AdamW eps 1e-6 so near-zero gradients do not amplify them). bf16: 2e-2 relative on losses/norms.
"""
from __future__ import annotations

import json

import pytest
import torch

from harness import DistributedWorkers
from test_optimizer_dist import (BF16_REL, assert_same_training, build, configs,
                                 full_params, make_optimizer, model_config, reference,
                                 run_steps, train)

from megalite.distributed.parallel_state import ParallelState
from megalite.errors import MegaliteError


@pytest.fixture(scope="module")
def workers2():
    with DistributedWorkers(2) as w:
        yield w


@pytest.fixture(scope="module")
def workers4():
    with DistributedWorkers(4) as w:
        yield w


# -- exactness -------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_dp2_matches_single_process(workers2, stage):
    ref, init = reference("tiny")
    results = workers2.run(train, "tiny", zero_stage=stage)
    assert_same_training(results, ref, init)


@pytest.mark.parametrize("recipe,tp,pp,vp,sp,stage", [
    ("tiny-llama", 2, 1, 1, False, 1),
    ("tiny", 2, 1, 1, True, 2),
    ("tiny", 1, 2, 1, False, 1),
    ("tiny-4l", 1, 2, 2, False, 1),
], ids=["zero1-tp2-dp2", "zero2-tp2-dp2-sp", "zero1-pp2-dp2-tied", "zero1-pp2-vp2-dp2-tied"])
def test_zero_with_model_parallelism_matches_single_process(workers4, recipe, tp, pp, vp, sp,
                                                            stage):
    ref, init = reference(recipe)
    results = workers4.run(train, recipe, tp, pp, stage, sp=sp, vp=vp)
    assert_same_training(results, ref, init,
                         tied=model_config(recipe).tied_embeddings and pp > 1)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_bf16_tracks_bf16_single_process(workers2, stage):
    ref, _ = reference("tiny-llama", bf16=True)
    results = workers2.run(train, "tiny-llama", zero_stage=stage, bf16=True)
    for got in results:
        for a, b in zip(got["losses"] + got["norms"], ref["losses"] + ref["norms"]):
            assert abs(a - b) <= BF16_REL * b
        assert all(p.dtype == torch.float32 for p in got["params"].values())
    assert results[0]["losses"][-1] < results[0]["losses"][0]


# fp16: DeepSpeed's loss scaler, set from megalite's flags. 5e-3 relative on losses and norms:
# fp16 keeps 11 significant bits (one rounding ~5e-4), and the DP reduction sums the fp16
# gradients in another order than one process; measured <= 4e-5 here, while a gradient scaled
# twice or not unscaled would be off by a factor of the scale (65536).
FP16_REL = 5e-3


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_fp16_tracks_fp16_single_process(workers2, stage):
    ref, _ = reference("tiny-llama", fp16=True)
    results = workers2.run(train, "tiny-llama", zero_stage=stage, fp16=True)
    for got in results:
        assert got["skipped"] == ref["skipped"] == [False] * len(ref["losses"])
        for a, b in zip(got["losses"] + got["norms"], ref["losses"] + ref["norms"]):
            assert abs(a - b) <= FP16_REL * b
    assert results[0]["losses"][-1] < results[0]["losses"][0]


def fp16_overflows(stage):
    """8 steps from a loss scale so large that every scaled gradient overflows."""
    ps, chunks = build("tiny-llama", 1, 1)
    opt = make_optimizer(chunks, ps, stage, {"fp16": True, "initial_loss_scale": 2.0 ** 30,
                                             "hysteresis": 2})
    before = full_params(chunks, ps, opt)
    _, results = run_steps(chunks, opt, ps, 8)
    after = full_params(chunks, ps, opt)
    return ([(r.skipped, r.loss_scale) for r in results],
            all(torch.equal(before[n], after[n]) for n in before))


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_fp16_overflow_skips_and_backs_off_like_megalite(workers2, stage):
    """The same rule as megalite's scaler: every step skipped, the first overflow only spends
    the hysteresis, then the scale halves per overflow; the weights never move."""
    with DistributedWorkers(1) as one:
        (ref, _), = one.run(fp16_overflows, 0)
    assert ref == [(True, 2.0 ** 30), (True, 2.0 ** 30)] + [(True, 2.0 ** (29 - i))
                                                            for i in range(6)]
    for steps, unchanged in workers2.run(fp16_overflows, stage):
        assert steps == ref and unchanged


# -- memory: optimizer state per rank falls as 1/DP ------------------------------------------
def state_bytes() -> dict[int, int]:
    """Optimizer-state bytes on this rank for each stage, after one step (AdamW creates its
    moments lazily)."""
    out = {}
    for stage in (1, 2, 3):
        ps, chunks = build("tiny", 1, 1)
        opt = make_optimizer(chunks, ps, stage, {})
        run_steps(chunks, opt, ps, 1)
        out[stage] = opt.optimizer_state_bytes()
    return out


def test_optimizer_state_memory_falls_as_one_over_dp(workers2):
    with DistributedWorkers(1) as one:
        (dp1,) = one.run(state_bytes)
    dp2 = workers2.run(state_bytes)
    _, chunks = build("tiny", 1, 1)
    numel = sum(p.numel() for p in chunks[0].parameters())
    for stage in (1, 2, 3):
        print(f"ZeRO-{stage}: {numel} parameters, optimizer state bytes per rank: DP=1 "
              f"{dp1[stage]}, DP=2 {[r[stage] for r in dp2]}")
        # fp32 master partition + AdamW's two moments: 12 bytes per parameter over DP ranks
        assert abs(dp1[stage] - 12 * numel) <= 0.01 * 12 * numel
        for r in dp2:   # each rank half of it, within DeepSpeed's alignment padding
            assert abs(r[stage] - dp1[stage] / 2) <= 0.01 * dp1[stage]


# -- resume ----------------------------------------------------------------------------------
def resume_is_bitwise(stage: int, precision_kw=None):
    precision_kw = precision_kw or {}
    ps, chunks = build("tiny", 1, 1)
    opt = make_optimizer(chunks, ps, stage, precision_kw)
    run_steps(chunks, opt, ps, 2)
    saved_model = {n: p.detach().clone() for n, p in full_params(chunks, ps, opt).items()}
    saved = opt.state_dict()        # a snapshot (cloned tensors), plain data
    from megalite.checkpoint.io import check_plain
    check_plain(saved, "ZeRO state")
    _, results = run_steps(chunks, opt, ps, 2)
    after = full_params(chunks, ps, opt)
    # a fresh run from the initial weights, loaded from the saved state
    ps2, chunks2 = build("tiny", 1, 1)
    opt2 = make_optimizer(chunks2, ps2, stage, precision_kw)
    opt2.load_state_dict(saved)
    loaded = full_params(chunks2, ps2, opt2)
    _, results2 = run_steps(chunks2, opt2, ps2, 2)
    scales = [r.loss_scale for r in results], [r.loss_scale for r in results2]
    return saved_model, loaded, after, full_params(chunks2, ps2, opt2), scales


# fp16 with a window of 1: the scale changes every step, so the scaler's state must come back
@pytest.mark.parametrize("stage,precision_kw", [
    (1, None), (2, None), (3, None), (2, {"fp16": True, "loss_scale_window": 1}),
    (3, {"fp16": True, "loss_scale_window": 1})],
    ids=["zero1", "zero2", "zero3", "zero2-fp16", "zero3-fp16"])
def test_zero_resume_is_bitwise(workers2, stage, precision_kw):
    for saved_model, loaded, after, resumed, (scales, scales2) in workers2.run(
            resume_is_bitwise, stage, precision_kw):
        assert scales == scales2
        if precision_kw:   # 2 clean steps, then doubling every step: 2^16 -> 2^17, 2^18
            assert scales == [2.0 ** 17, 2.0 ** 18], scales
        for n in saved_model:
            assert torch.equal(loaded[n], saved_model[n]), n
            assert torch.equal(resumed[n], after[n]), n


# -- start-up errors -------------------------------------------------------------------------
@pytest.mark.parametrize("stage,sizes,kw,match", [
    (2, (1, 2, 2), {}, "--zero-stage 2 cannot be combined with pipeline"),
    (3, (2, 1, 2), {}, "--zero-stage 3 needs --tensor-model-parallel-size 1"),
    (3, (1, 2, 2), {}, "--zero-stage 3 needs"),
    (1, (1, 1, 2), {"fp16": True, "initial_loss_scale": 1000.0},
     "--initial-loss-scale must be a power of 2"),
    (4, (1, 1, 2), {}, "--zero-stage must be 0, 1, 2 or 3"),
])
def test_validate_zero_refuses(stage, sizes, kw, match):
    from megalite.optim.zero import validate_zero
    _, precision = configs(**kw)
    with pytest.raises(MegaliteError, match=match):
        validate_zero(stage, sizes, precision)


@pytest.mark.parametrize("stage,sizes", [(1, (2, 2, 2)), (2, (2, 1, 2)), (3, (1, 1, 2)),
                                          (0, (2, 2, 1))])
def test_validate_zero_accepts(stage, sizes):
    from megalite.optim.zero import validate_zero
    _, precision = configs()
    validate_zero(stage, sizes, precision)
    if stage:
        validate_zero(stage, sizes, configs(bf16=True)[1])
        validate_zero(stage, sizes, configs(fp16=True)[1])
        validate_zero(stage, sizes, configs(fp16=True, loss_scale=1000.0)[1])   # static: any


@pytest.mark.parametrize("user,match", [
    ({"optimizer": {"type": "Adam"}}, "remove the 'optimizer' section"),
    ({"scheduler": {"type": "WarmupLR"}}, "remove the 'scheduler' section"),
    ({"zero_optimization": {"stage": 2}}, "contradicts --zero-stage 1"),
    ({"gradient_clipping": 2.0}, "contradicts --clip-grad"),
    ({"bf16": {"enabled": True}}, "bf16.enabled"),
    ({"fp16": {"enabled": True}}, "fp16.enabled"),
    ({"train_micro_batch_size_per_gpu": 7}, "train_micro_batch_size_per_gpu"),
    ([1, 2], "top level must be a JSON object"),
])
def test_deepspeed_config_conflicts_are_clear(tmp_path, user, match):
    from megalite.optim.zero import deepspeed_config
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    optim, precision = configs()
    with pytest.raises(MegaliteError, match=match) as err:
        deepspeed_config(1, optim, precision, ParallelState.single(), str(path),
                         micro_batch_size=2)
    assert str(path) in str(err.value)


def test_deepspeed_config_merges_and_reads_stage(tmp_path):
    from megalite.optim.zero import deepspeed_config
    optim, precision = configs()
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": 12345},
                                "gradient_clipping": optim.clip_grad,
                                "train_micro_batch_size_per_gpu": 2}))
    stage, cfg = deepspeed_config(0, optim, precision, ParallelState.single(), str(path),
                                  micro_batch_size=2)
    assert stage == 2 and cfg["zero_optimization"]["stage"] == 2
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 12345     # user's tuning kept
    assert cfg["gradient_clipping"] == optim.clip_grad and cfg["bf16"]["enabled"] is False
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(MegaliteError, match=r"bad\.json: not valid JSON \(line 1"):
        deepspeed_config(1, optim, precision, ParallelState.single(), str(bad))
    with pytest.raises(MegaliteError, match="cannot read"):
        deepspeed_config(1, optim, precision, ParallelState.single(), str(tmp_path / "nope"))


def test_deepspeed_fp16_section_comes_from_megalite_flags(tmp_path):
    from megalite.optim.zero import deepspeed_config
    optim, precision = configs(fp16=True, initial_loss_scale=2.0 ** 12, hysteresis=3,
                               loss_scale_window=50, min_loss_scale=0.5)
    _, cfg = deepspeed_config(1, optim, precision, ParallelState.single())
    assert cfg["fp16"] == {"enabled": True, "loss_scale": 0.0, "initial_scale_power": 12,
                           "loss_scale_window": 50, "hysteresis": 3, "min_loss_scale": 0.5}
    _, cfg = deepspeed_config(1, *configs(fp16=True, loss_scale=128.0), ParallelState.single())
    assert cfg["fp16"]["loss_scale"] == 128.0 and "initial_scale_power" not in cfg["fp16"]
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"fp16": {"enabled": True, "hysteresis": 5}}))
    with pytest.raises(MegaliteError, match="fp16.hysteresis = 5 contradicts"):
        deepspeed_config(1, optim, precision, ParallelState.single(), str(path))
