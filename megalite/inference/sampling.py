"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus).

Applied in Hugging Face's order: logits / temperature, then keep the k largest, then keep the
smallest set of the most likely tokens whose probability reaches p (always at least one), then
draw from the renormalized distribution with the caller's ``torch.Generator``. Under tensor
parallelism every rank holds the same full logits and a generator seeded alike, so all ranks
draw the same token (the generation loop also broadcasts it, to be independent of that).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megalite.errors import MegaliteError

__all__ = ["SamplingConfig", "filter_logits", "sample_next"]


@dataclass
class SamplingConfig:
    """How the next token is chosen."""

    greedy: bool = True
    """Take the most likely token (the other fields are then ignored)."""
    temperature: float = 1.0
    """Divide the logits by this (> 0) before sampling; < 1 sharpens, > 1 flattens."""
    top_k: int = 0
    """Sample only among the k most likely tokens; 0 disables."""
    top_p: float = 1.0
    """Sample only among the smallest set of most likely tokens whose probability reaches p
    (nucleus sampling), in (0, 1]; 1 disables."""

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise MegaliteError(f"--temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise MegaliteError(f"--top-k must be >= 0 (0: off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise MegaliteError(f"--top-p must be in (0, 1], got {self.top_p}")


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """``logits`` [b, V] with every token outside the top-k / nucleus set set to -inf (a copy).

    Top-k keeps exactly k tokens (ties at the boundary broken by ``torch.topk``); top-p keeps,
    per row, the most likely tokens until their cumulative probability (after top-k) reaches
    ``top_p``: token i of the descending order is kept iff the mass before it is < top_p.
    """
    out = logits.clone()
    neg_inf = torch.tensor(float("-inf"), dtype=out.dtype, device=out.device)
    if 0 < top_k < out.shape[-1]:
        keep = torch.zeros_like(out, dtype=torch.bool)
        keep.scatter_(-1, out.topk(top_k, dim=-1).indices, True)
        out = torch.where(keep, out, neg_inf)
    if top_p < 1.0:
        sorted_logits, order = out.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        keep_sorted = mass_before < top_p
        keep_sorted[..., 0] = True
        keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
        out = torch.where(keep, out, neg_inf)
    return out


def sample_next(logits: Tensor, config: SamplingConfig,
                generator: torch.Generator | None = None) -> Tensor:
    """Next token ids [b] (int64) from ``logits`` [b, V] (only real vocabulary columns).

    Computed in float32. ``generator`` must live on ``logits.device``; unused when greedy.
    """
    logits = logits.float()
    if config.greedy:
        return logits.argmax(dim=-1)
    filtered = filter_logits(logits / config.temperature, config.top_k, config.top_p)
    probs = filtered.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
