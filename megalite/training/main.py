"""``megalite train``: pretraining from a YAML config and/or Megatron-LM flags.

Single process: ``megalite train --config configs/tiny-gpt.yaml --mock-data``.
Several processes: ``torchrun --nproc-per-node 4 -m megalite train --tensor-model-parallel-size 2
--pipeline-model-parallel-size 2 ...`` (rank, world and master come from torchrun's variables).
"""
from __future__ import annotations

import os

import torch.distributed as dist


def main(argv=None) -> int:
    from megalite.config import parse_train_args

    config = parse_train_args(argv)  # before the heavy imports: --help and flag errors stay fast
    from megalite.training.trainer import pretrain

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        from megalite.distributed.parallel_state import init_distributed
        init_distributed()
    try:
        pretrain(config)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
