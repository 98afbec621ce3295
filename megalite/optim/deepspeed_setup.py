"""DeepSpeed set-up for megalite's ZeRO optimizer: the ``mpu`` view of a ParallelState, the
start-up check of supported ZeRO combinations, and the DeepSpeed config built from megalite's
flags merged with a user's ``--deepspeed-config`` file. No DeepSpeed import here (cheap to call
from argument parsing); :mod:`megalite.optim.zero` uses these.
"""
from __future__ import annotations

import contextlib
import json
import math

from megalite.distributed.parallel_state import ParallelState
from megalite.errors import MegaliteError

__all__ = ["DeepSpeedMpu", "validate_zero", "deepspeed_config", "without_shm_inference_op"]


# DeepSpeed's mpu accessor -> the ParallelState attribute it reads (Megatron's names).
_MPU_ACCESSORS = {
    "get_model_parallel_rank": "tp_rank",
    "get_model_parallel_world_size": "tp_size",
    "get_model_parallel_group": "mp_group",
    "get_tensor_model_parallel_rank": "tp_rank",
    "get_tensor_model_parallel_world_size": "tp_size",
    "get_tensor_model_parallel_group": "tp_group",
    "get_pipeline_model_parallel_rank": "pp_rank",
    "get_pipeline_model_parallel_world_size": "pp_size",
    "get_pipeline_model_parallel_group": "pp_group",
    "get_data_parallel_rank": "dp_rank",
    "get_data_parallel_world_size": "dp_size",
    "get_data_parallel_group": "dp_group",
}


class DeepSpeedMpu:
    """megalite's layout in the shape DeepSpeed's ``mpu`` argument expects (Megatron's names):
    each method of :data:`_MPU_ACCESSORS` returns that attribute of the ParallelState.

    As in Megatron-DeepSpeed, the "model-parallel rank" is the tensor-parallel rank (DeepSpeed
    counts replicated parameters in the gradient norm on model-parallel rank 0 only) while the
    "model-parallel group" is the whole tp x pp group (over which it sums the norm).
    """

    def __init__(self, ps: ParallelState):
        self.ps = ps
        for method, attribute in _MPU_ACCESSORS.items():
            setattr(self, method, lambda attribute=attribute: getattr(ps, attribute))

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.ps.tp_group_ranks[0]

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.ps.dp_group_ranks)


def _sizes(ps_or_sizes) -> tuple[int, int, int]:
    if isinstance(ps_or_sizes, ParallelState):
        return ps_or_sizes.tp_size, ps_or_sizes.pp_size, ps_or_sizes.dp_size
    tp, pp, dp = ps_or_sizes
    return tp, pp, dp


def validate_zero(zero_stage: int, ps_or_sizes, precision) -> None:
    """Raise MegaliteError at start-up for a ZeRO setting megalite cannot run.

    ``ps_or_sizes``: a ParallelState or ``(tp, pp, dp)``. Stage 0 (off) is always fine.
    """
    tp, pp, dp = _sizes(ps_or_sizes)
    if zero_stage not in (0, 1, 2, 3):
        raise MegaliteError(f"--zero-stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    if zero_stage == 0:
        return
    if zero_stage == 2 and pp > 1:
        raise MegaliteError(
            f"--zero-stage 2 cannot be combined with pipeline parallelism "
            f"(--pipeline-model-parallel-size {pp}); DeepSpeed supports only ZeRO-1 with "
            f"pipelining: use --zero-stage 1")
    if zero_stage == 3 and (tp > 1 or pp > 1):
        raise MegaliteError(
            f"--zero-stage 3 needs --tensor-model-parallel-size 1 and "
            f"--pipeline-model-parallel-size 1 (got {tp} and {pp}): DeepSpeed's parameter "
            f"partitioning does not know megalite's tensor/pipeline splits; use --zero-stage 1 "
            f"(any TP/PP) or 2 (TP without PP)")
    if precision.fp16 and precision.loss_scale is None:
        power = math.log2(precision.initial_loss_scale)
        if power != int(power):
            raise MegaliteError(f"--zero-stage {zero_stage} with --fp16: --initial-loss-scale "
                                f"must be a power of 2 (DeepSpeed's initial_scale_power), got "
                                f"{precision.initial_loss_scale:g}")


# Keys megalite owns in a user's --deepspeed-config: the value megalite would write must match.
_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu",
               "gradient_accumulation_steps")


def deepspeed_config(zero_stage: int, optim, precision, ps: ParallelState,
                     user_config: str | dict | None = None, *,
                     micro_batch_size: int | None = None,
                     global_batch_size: int | None = None) -> tuple[int, dict]:
    """The DeepSpeed config for megalite's flags, merged with a user's ``--deepspeed-config``.

    Returns ``(effective zero stage, config dict)``. The user's file may tune anything under
    ``zero_optimization`` (bucket sizes, ...) and may set the stage when ``--zero-stage`` is
    0; it may not contradict megalite's flags (stage, ``gradient_clipping``, bf16/fp16, batch
    sizes) nor bring its own ``optimizer``/``scheduler`` (megalite's AdamW and LR schedule
    drive DeepSpeed): each is a MegaliteError naming the key and the file.
    """
    where = "--deepspeed-config"
    user: dict = {}
    if isinstance(user_config, str):
        where = f"--deepspeed-config {user_config}"
        try:
            with open(user_config, encoding="utf-8") as f:
                user = json.load(f)
        except OSError as e:
            raise MegaliteError(f"{where}: cannot read: {e.strerror or e}") from None
        except json.JSONDecodeError as e:
            raise MegaliteError(f"{where}: not valid JSON (line {e.lineno}, column {e.colno}: "
                                f"{e.msg})") from None
    elif isinstance(user_config, dict):
        user = json.loads(json.dumps(user_config))
    if not isinstance(user, dict):
        raise MegaliteError(f"{where}: the top level must be a JSON object")
    for key in ("optimizer", "scheduler"):
        if key in user:
            raise MegaliteError(f"{where}: remove the {key!r} section; megalite supplies AdamW "
                                f"and the LR schedule (--lr, --min-lr, --lr-decay-style, ...)")
    zero = user.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise MegaliteError(f"{where}: 'zero_optimization' must be an object")
    file_stage = zero.get("stage")
    stage = zero_stage
    if file_stage is not None:
        if zero_stage and file_stage != zero_stage:
            raise MegaliteError(f"{where}: zero_optimization.stage = {file_stage} contradicts "
                                f"--zero-stage {zero_stage}")
        stage = int(file_stage)
    clip = user.get("gradient_clipping")
    if clip is not None and not math.isclose(float(clip), float(optim.clip_grad)):
        raise MegaliteError(f"{where}: gradient_clipping = {clip} contradicts --clip-grad "
                            f"{optim.clip_grad}")
    for key, flag, on in (("bf16", "--bf16", precision.bf16), ("fp16", "--fp16", precision.fp16)):
        section = user.get(key, {})
        enabled = bool(section.get("enabled", False)) if isinstance(section, dict) else None
        if enabled is None or (key in user and enabled != on):
            raise MegaliteError(f"{where}: {key}.enabled = {section!r} contradicts megalite's "
                                f"flags ({flag} {'given' if on else 'not given'})")
    mine = {"train_micro_batch_size_per_gpu": micro_batch_size or 1,
            "gradient_accumulation_steps": 1}
    mine["train_batch_size"] = mine["train_micro_batch_size_per_gpu"] * ps.dp_size
    for key in _BATCH_KEYS:
        if key in user and user[key] not in (mine[key], "auto"):
            if key != "train_batch_size" or user[key] != global_batch_size:
                raise MegaliteError(
                    f"{where}: {key} = {user[key]!r} contradicts megalite's batch flags "
                    f"(--micro-batch-size / --global-batch-size drive the schedule; "
                    f"remove {key} from the file)")
    config = dict(user)
    config.update(mine)
    config["zero_optimization"] = {
        # Deterministic, synchronous reduction; users may override the tuning keys.
        "overlap_comm": False, "contiguous_gradients": True, "reduce_scatter": True,
        **zero, "stage": stage}
    if stage == 3:
        config["managed_gradient_accumulation"] = False
        if precision.bf16 or precision.fp16:
            # Each microbatch's half-precision gradients are reduced and accumulated in fp32
            # (DeepSpeed's default would do both in bf16/fp16).
            config.setdefault("data_types", {"grad_accum_dtype": "fp32"})
            config.setdefault("communication_data_type", "fp32")
    config["gradient_clipping"] = float(optim.clip_grad)
    config["bf16"] = {**(user.get("bf16") or {}), "enabled": bool(precision.bf16)}
    config["fp16"] = _fp16_section(precision, user.get("fp16") or {}, where)
    config["zero_allow_untested_optimizer"] = True
    config.setdefault("steps_per_print", 2**62)
    config.setdefault("wall_clock_breakdown", False)
    return stage, config


def _fp16_section(precision, user: dict, where: str) -> dict:
    """DeepSpeed's ``fp16`` section from megalite's loss-scaling flags. DeepSpeed's dynamic
    scaler follows megalite's rule (overflows spend the hysteresis, then halve the scale; clean
    steps double it every ``loss_scale_window``) with one difference: after the start or an
    overflow it doubles one clean step later (after window + 1 steps, then every window)."""
    if not precision.fp16:
        return {"enabled": False}
    static = precision.loss_scale is not None
    mine = {"enabled": True, "loss_scale": float(precision.loss_scale) if static else 0.0,
            "loss_scale_window": int(precision.loss_scale_window),
            "hysteresis": int(precision.hysteresis),
            "min_loss_scale": float(precision.min_loss_scale)}
    if not static:
        mine["initial_scale_power"] = int(math.log2(precision.initial_loss_scale))
    for key, value in user.items():
        if key in mine and value != mine[key]:
            raise MegaliteError(f"{where}: fp16.{key} = {value!r} contradicts megalite's loss "
                                f"scaling flags (--loss-scale, --initial-loss-scale, "
                                f"--loss-scale-window, --hysteresis, --min-loss-scale); remove "
                                f"it from the file")
    return {**user, **mine}


def allow_fp16_on_cpu(deepspeed) -> None:
    """Let DeepSpeed's CPU accelerator accept fp16 on CPUs without oneDNN's fp16 kernels.

    DeepSpeed refuses fp16 on a CPU unless ``torch.ops.mkldnn._is_mkldnn_fp16_supported()``
    (AVX512-FP16 or AMX-FP16): a speed test, not a correctness one. torch computes fp16 on every
    CPU, and ZeRO's fp32 masters and reductions are the same; without this the fp16 ZeRO path
    (and its tests) would run on one CPU model and fail on the next. A no-op on GPUs."""
    accelerator = deepspeed.accelerator.get_accelerator()
    if accelerator.device_name() == "cpu" and not accelerator.is_fp16_supported():
        accelerator.is_fp16_supported = lambda: True


@contextlib.contextmanager
def without_shm_inference_op(deepspeed):
    """While DeepSpeed sets up its communication backend, mark its CPU shared-memory op as
    unavailable: that op only serves ``inference_all_reduce`` (ZeRO training uses
    torch.distributed's collectives), but DeepSpeed JIT-compiles it with g++ on first use, which
    costs minutes on a fresh machine (4 min measured on the 2-core dev box) before the first
    ZeRO step. Restored afterwards; a no-op if DeepSpeed's backend already exists."""
    ops = getattr(deepspeed.ops, "__compatible_ops__", None)
    key = "deepspeed_shm_comm"
    if not isinstance(ops, dict) or key not in ops:
        yield
        return
    saved = ops[key]
    ops[key] = False
    try:
        yield
    finally:
        ops[key] = saved
