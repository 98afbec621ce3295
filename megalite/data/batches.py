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
items are dicts of arrays (BERT, T5) stack each field (:func:`stacked_microbatch`). Each
pipeline stage keeps only the fields its chunks read (``fields``: the family's
``stage_fields``; GPT: the first stage ``tokens``, the last ``labels``, a middle stage nothing,
so it reads no samples at all, unless packed documents' fields reach every stage), and only
those are copied to the device.

Prefetch (``prefetch=True``, the training batches): while the current global batch computes,
a background thread reads and collates the next one and starts its copy to the device (pinned
host memory and a non-blocking copy on a GPU). The batch is the same as without prefetching: it
is taken only if ``consumed_samples`` still points at it (a resume or an evaluation that moves
it makes the prefetched batch be dropped and rebuilt).
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
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
                    collate: Callable[[list], dict] = gpt_microbatch,
                    fields: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """Samples ``ids`` of ``dataset`` made into one microbatch by ``collate`` (default GPT's
    :func:`gpt_microbatch`), on ``device``. ``fields``: keep only these keys (None: all; empty:
    no sample is read, ``{}``). On a GPU the copy is non-blocking from pinned memory."""
    if fields is not None and not fields:
        return {}
    batch = collate([dataset[i] for i in ids])
    if fields is not None:
        batch = {k: batch[k] for k in fields if k in batch}
    if device is None or torch.device(device).type == "cpu":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


class BatchIterator:
    """Global batches of one data-parallel rank, resumable from a consumed-sample count.

    ``next_global_batch()`` returns this rank's list of microbatch dicts for the next global
    batch and advances ``consumed_samples`` by the global batch size (all DP ranks together).
    Sample ids wrap around the dataset length, so evaluation can cycle over a small split.
    ``collate``, ``fields``: see :func:`make_microbatch`; ``prefetch``: prepare the next global
    batch in a background thread (module docstring).
    """

    def __init__(self, dataset: Sequence, global_batch_size: int, micro_batch_size: int,
                 dp_size: int, dp_rank: int, consumed_samples: int = 0, device=None,
                 collate: Callable[[list], dict] = gpt_microbatch,
                 fields: tuple[str, ...] | None = None, prefetch: bool = False):
        if len(dataset) == 0:
            raise MegaliteError("the dataset has no samples")
        self.dataset, self.device, self.collate = dataset, device, collate
        self.fields = fields
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="megalite-batches") \
            if prefetch else None
        self._next: tuple[int, Future] | None = None     # (its first sample, the batch)
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_size, self.dp_rank = dp_size, dp_rank
        self.consumed_samples = consumed_samples
        # validate the sizes once, up front
        microbatch_sample_ids(global_batch_size, micro_batch_size, dp_size, dp_rank)

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def _global_batch(self, start: int) -> list[dict[str, torch.Tensor]]:
        ids = microbatch_sample_ids(self.global_batch_size, self.micro_batch_size,
                                    self.dp_size, self.dp_rank, start)
        n = len(self.dataset)
        return [make_microbatch(self.dataset, [i % n for i in mb], self.device, self.collate,
                                self.fields) for mb in ids]

    def next_global_batch(self) -> list[dict[str, torch.Tensor]]:
        """This rank's microbatches of the global batch at ``consumed_samples``; advances it
        (and, with prefetch, starts preparing the one after)."""
        start = self.consumed_samples
        ahead, self._next = self._next, None
        batch = ahead[1].result() if ahead is not None and ahead[0] == start else \
            self._global_batch(start)
        self.consumed_samples = start + self.global_batch_size
        if self._pool is not None:
            following = self.consumed_samples
            self._next = (following, self._pool.submit(self._global_batch, following))
        return batch

    def __iter__(self) -> Iterator[list[dict[str, torch.Tensor]]]:
        while True:
            yield self.next_global_batch()
