"""Batches for one data-parallel rank: global batch -> this rank's microbatches.

Sample order (Megatron's pretraining sampler): the training run consumes the dataset's sample ids
``0, 1, 2, ...`` in order (the dataset itself is shuffled). Global batch ``k`` is the samples
``[k*G, (k+1)*G)``; it is cut into steps of ``micro_batch_size * dp_size`` consecutive samples and
data-parallel rank ``r`` takes the ``r``-th ``micro_batch_size`` of each step. Every layout
therefore sees the same global batch, so the global-batch mean loss is layout-independent.

A microbatch is ``{"tokens": int64 [b, s], "labels": int64 [b, s]}``: the ``s + 1`` tokens of a
sample shifted by one. Every pipeline stage builds the same microbatches (it is cheap); only the
first model chunk reads ``tokens`` and only the last reads ``labels``.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

from megalite.errors import MegaliteError


def microbatch_sample_ids(global_batch_size: int, micro_batch_size: int, dp_size: int,
                          dp_rank: int, start_sample: int = 0) -> list[list[int]]:
    """Sample ids of this DP rank's microbatches of the global batch that starts at sample
    ``start_sample``: a list of ``G / (m * dp)`` lists of ``m`` ids."""
    step = micro_batch_size * dp_size
    if global_batch_size % step:
        raise MegaliteError(f"--global-batch-size {global_batch_size} is not a multiple of "
                            f"--micro-batch-size {micro_batch_size} x data-parallel size {dp_size}")
    base = start_sample
    return [list(range(base + j * step + dp_rank * micro_batch_size,
                       base + j * step + (dp_rank + 1) * micro_batch_size))
            for j in range(global_batch_size // step)]


def make_microbatch(dataset: Sequence, ids: list[int], device=None) -> dict[str, torch.Tensor]:
    """Stack samples ``ids`` into ``{"tokens": [b, s], "labels": [b, s]}`` (int64)."""
    samples = np.stack([np.asarray(dataset[i], dtype=np.int64) for i in ids])
    batch = torch.from_numpy(samples)
    if device is not None:
        batch = batch.to(device)
    return {"tokens": batch[:, :-1].contiguous(), "labels": batch[:, 1:].contiguous()}


class BatchIterator:
    """Global batches of one data-parallel rank, resumable from a consumed-sample count.

    ``next_global_batch()`` returns this rank's list of microbatch dicts for the next global
    batch and advances ``consumed_samples`` by the global batch size (all DP ranks together).
    Sample ids wrap around the dataset length, so evaluation can cycle over a small split.
    """

    def __init__(self, dataset: Sequence, global_batch_size: int, micro_batch_size: int,
                 dp_size: int, dp_rank: int, consumed_samples: int = 0, device=None):
        if len(dataset) == 0:
            raise MegaliteError("the dataset has no samples")
        self.dataset, self.device = dataset, device
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_size, self.dp_rank = dp_size, dp_rank
        self.consumed_samples = consumed_samples
        # validate the sizes once, up front
        microbatch_sample_ids(global_batch_size, micro_batch_size, dp_size, dp_rank)

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def next_global_batch(self) -> list[dict[str, torch.Tensor]]:
        ids = microbatch_sample_ids(self.global_batch_size, self.micro_batch_size,
                                    self.dp_size, self.dp_rank, self.consumed_samples)
        self.consumed_samples += self.global_batch_size
        n = len(self.dataset)
        return [make_microbatch(self.dataset, [i % n for i in mb], self.device) for mb in ids]

    def __iter__(self) -> Iterator[list[dict[str, torch.Tensor]]]:
        while True:
            yield self.next_global_batch()
