"""Loss scaling for fp16 training: a static scale, or a dynamic one that backs off on overflow.

fp16 has 5 exponent bits: gradients of a small loss underflow to zero. The loss is multiplied by
``scale`` before backward (the pipeline schedule does that with ``Optimizer.loss_scale``) and
the gradients are divided by it before the update. With a dynamic scale an overflow (inf/nan in
any gradient on any rank) skips the step; after ``hysteresis`` overflows the scale is halved
(never below ``min_scale``); after ``window`` clean steps in a row it is doubled.

The state is a handful of Python numbers (``state_dict``), so a resumed run continues with
exactly the same scale schedule.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from megalite.errors import MegaliteError

__all__ = ["LossScaler", "build_loss_scaler"]


@dataclass
class LossScaler:
    """Loss scale and its update rule (``dynamic=False``: a constant scale)."""

    scale: float = 1.0
    """Current loss scale: the schedule multiplies the loss by it, the optimizer divides by it."""
    dynamic: bool = False
    """Adjust the scale on overflow / after clean windows (fp16) or keep it constant."""
    min_scale: float = 1.0
    """The dynamic scale never drops below this."""
    window: int = 1000
    """Clean (overflow-free) steps in a row after which the dynamic scale doubles."""
    hysteresis: int = 2
    """Overflows tolerated before the dynamic scale is halved (the counter resets on growth)."""
    growth_tracker: int = 0
    """Clean steps since the last overflow or growth."""
    hysteresis_left: int = 2
    """Overflows still tolerated before the next halving."""

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise MegaliteError(f"loss scale must be positive, got {self.scale}")
        if self.dynamic and (self.window < 1 or self.hysteresis < 1 or not self.min_scale > 0):
            raise MegaliteError(f"dynamic loss scaling needs loss_scale_window >= 1, "
                                f"hysteresis >= 1 and min_loss_scale > 0; got window="
                                f"{self.window}, hysteresis={self.hysteresis}, "
                                f"min={self.min_scale}")

    def update(self, found_inf: bool) -> None:
        """Record the outcome of one step (``found_inf``: it was skipped for an overflow)."""
        if not self.dynamic:
            return
        if found_inf:
            self.growth_tracker = 0
            self.hysteresis_left -= 1
            if self.hysteresis_left <= 0:
                self.scale = max(self.scale / 2.0, self.min_scale)
        else:
            self.growth_tracker += 1
            if self.growth_tracker == self.window:
                self.growth_tracker = 0
                self.hysteresis_left = self.hysteresis
                self.scale *= 2.0

    def state_dict(self) -> dict:
        """Every field (plain Python numbers)."""
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        """Restore the fields saved by :meth:`state_dict`."""
        for key, value in state.items():
            if not hasattr(self, key):
                raise MegaliteError(f"loss scaler state has an unknown field {key!r}")
            setattr(self, key, value)


def build_loss_scaler(precision) -> LossScaler:
    """The scaler a :class:`~megalite.config.PrecisionConfig` asks for.

    fp16: static when ``precision.loss_scale`` is set, else dynamic starting at
    ``initial_loss_scale``. bf16 and fp32 need no scaling: a constant 1.0.
    """
    if not precision.fp16:
        return LossScaler(scale=1.0, dynamic=False)
    if precision.loss_scale is not None:
        return LossScaler(scale=float(precision.loss_scale), dynamic=False)
    return LossScaler(scale=float(precision.initial_loss_scale), dynamic=True,
                      min_scale=float(precision.min_loss_scale),
                      window=int(precision.loss_scale_window),
                      hysteresis=int(precision.hysteresis),
                      hysteresis_left=int(precision.hysteresis))
