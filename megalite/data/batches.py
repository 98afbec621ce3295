"""Batches for one data-parallel rank: global batch -> this rank's microbatches.

Sample order (Megatron's pretraining sampler): the training run consumes the dataset's sample ids
``0, 1, 2, ...`` in order (the dataset itself is shuffled). Global batch ``k`` is the samples
``[k*G, (k+1)*G)``; it is cut into steps of ``micro_batch_size * dp_size`` consecutive samples and
data-parallel rank ``r`` takes the ``r``-th ``micro_batch_size`` of each step. Every layout
therefore sees the same global batch, so the global-batch mean loss is layout-independent.

A microbatch is a dict of int64 tensors ``[b, ...]`` made from its samples by the model
family's ``collate`` (:mod:`megalite.families`): GPT's (:func:`gpt_microbatch`) is ``{"tokens":
[b, s], "labels": [b, s]}``, the ``s + 1`` tokens of a sample shifted by one (with the
document flags also ``position_ids``, ``doc_ids``, ``loss_mask`` [b, s]:
:mod:`megalite.data.documents`); datasets whose
items are dicts of arrays (BERT, T5) stack each field (:func:`stacked_microbatch`). Every
pipeline stage builds the same microbatches (it is cheap); each model chunk reads the fields it
needs (GPT: the first ``tokens``, the last ``labels``).
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

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


def gpt_microbatch(samples: list) -> dict[str, torch.Tensor]:
    """GPT samples (``s + 1`` token ids each) -> ``{"tokens": [b, s], "labels": [b, s]}``
    (int64): the tokens and the same tokens shifted by one."""
    batch = torch.from_numpy(np.stack([np.asarray(x, dtype=np.int64) for x in samples]))
    return {"tokens": batch[:, :-1].contiguous(), "labels": batch[:, 1:].contiguous()}


def stacked_microbatch(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Samples that are dicts of arrays (BERT, T5 items) -> ``{key: int64 [b, ...]}``, each
    key's arrays stacked along a new first dimension."""
    return {k: torch.from_numpy(np.stack([np.asarray(x[k], dtype=np.int64) for x in samples]))
            for k in samples[0]}


def make_microbatch(dataset: Sequence, ids: list[int], device=None,
                    collate: Callable[[list], dict] = gpt_microbatch
                    ) -> dict[str, torch.Tensor]:
    """Samples ``ids`` of ``dataset`` made into one microbatch by ``collate`` (default GPT's
    :func:`gpt_microbatch`), on ``device``."""
    batch = collate([dataset[i] for i in ids])
    return batch if device is None else {k: v.to(device) for k, v in batch.items()}


class BatchIterator:
    """Global batches of one data-parallel rank, resumable from a consumed-sample count.

    ``next_global_batch()`` returns this rank's list of microbatch dicts for the next global
    batch and advances ``consumed_samples`` by the global batch size (all DP ranks together).
    Sample ids wrap around the dataset length, so evaluation can cycle over a small split.
    ``collate``: the model family's (see :func:`make_microbatch`).
    """

    def __init__(self, dataset: Sequence, global_batch_size: int, micro_batch_size: int,
                 dp_size: int, dp_rank: int, consumed_samples: int = 0, device=None,
                 collate: Callable[[list], dict] = gpt_microbatch):
        if len(dataset) == 0:
            raise MegaliteError("the dataset has no samples")
        self.dataset, self.device, self.collate = dataset, device, collate
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
        return [make_microbatch(self.dataset, [i % n for i in mb], self.device, self.collate)
                for mb in ids]

    def __iter__(self) -> Iterator[list[dict[str, torch.Tensor]]]:
        while True:
            yield self.next_global_batch()
