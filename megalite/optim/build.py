"""The one place that picks the optimizer of a run: megalite's replicated AdamW or DeepSpeed
ZeRO (both :class:`~megalite.optim.base.TrainingOptimizer`)."""
from __future__ import annotations

from megalite.distributed.parallel_state import ParallelState
from megalite.optim.base import TrainingOptimizer
from megalite.optim.optimizer import Optimizer

__all__ = ["build_optimizer"]


def build_optimizer(model_chunks, config, ps: ParallelState) -> TrainingOptimizer:
    """megalite's :class:`~megalite.optim.optimizer.Optimizer`, or with ``--zero-stage`` /
    ``--deepspeed-config`` a :class:`~megalite.optim.zero.ZeroOptimizer`. ``config``: a
    TrainConfig; ``model_chunks``: this rank's chunks."""
    par = config.parallel
    if par.zero_stage == 0 and not par.deepspeed_config:
        return Optimizer(model_chunks, config.optim, config.precision, ps,
                         overlap_grad_reduce=par.overlap_grad_reduce)
    from megalite.optim.zero import ZeroOptimizer   # imports deepspeed: only when asked for
    training = config.training
    return ZeroOptimizer(model_chunks, config.optim, config.precision, ps, par.zero_stage,
                         user_config=par.deepspeed_config,
                         micro_batch_size=training.micro_batch_size,
                         global_batch_size=training.global_batch_size)
