"""Pipeline parallelism: layer split and model chunks (stages), point-to-point transfer of
activations and gradients (p2p), and the schedules (no pipelining, 1F1B, interleaved 1F1B)."""
from megalite.parallel.pipeline.schedules import (MicrobatchLoss, forward_backward,
                                                  schedule_order, schedule_steps)
from megalite.parallel.pipeline.stages import build_model_chunks, layer_ranges

__all__ = ["MicrobatchLoss", "build_model_chunks", "forward_backward", "layer_ranges",
           "schedule_order", "schedule_steps"]
