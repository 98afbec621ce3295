"""The decoding loop: prefill the prompt in one forward, then one token per forward.

Every tensor-parallel rank runs the same loop on its own shard of the model and of the KV cache.
Per step, each rank holds the logits of its vocabulary slice [b, Vp/tp]; they are all-gathered
over the tp group (cheap next to the model: one row per sequence) and the padding columns are
cut off, so every rank sees the same full [b, vocab_size] logits and chooses the same token. The
token is broadcast from the group's first rank all the same, so that the ranks can never diverge.
With ``vocab_size`` (the tokenizer's, when a model was trained with a larger ``--vocab-size``)
the logits are cut further, so that no id the tokenizer cannot decode is ever chosen.

``use_cache=False`` re-runs the whole sequence every step instead (the reference the tests
compare the cache against; quadratic, otherwise identical).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from megalite.errors import MegaliteError
from megalite.inference.kv_cache import KVCache
from megalite.inference.sampling import SamplingConfig, sample_next
from megalite.parallel.comm import all_gather

__all__ = ["GenerationOutput", "generate_tokens", "full_vocab_logits"]


@dataclass
class GenerationOutput:
    """What :func:`generate_tokens` produced (identical on every tensor-parallel rank)."""

    tokens: Tensor
    """[b, n] new token ids (int64, CPU), n <= max_new_tokens; a row that ended at ``eod``
    holds the eod and then eod padding."""
    logits: list[Tensor] = field(default_factory=list)
    """With ``keep_logits``: per step the logits [b, vocab_size] (float32, CPU) the token was
    chosen from (``vocab_size``: the argument of :func:`generate_tokens`, else the model's)."""
    finished: Tensor | None = None
    """[b] bool: the row produced ``eod``."""


def full_vocab_logits(local: Tensor, model) -> Tensor:
    """This rank's vocabulary slice [b, Vp/tp] -> the real vocabulary [b, vocab_size] (float32),
    gathered over the tensor-parallel group (a collective when tp > 1)."""
    ps = model.ps
    if ps.tp_size > 1:
        local = all_gather(local, -1, ps)
    return local[..., :model.config.vocab_size].float()


def _agree_on_tokens(ids: Tensor, ps) -> Tensor:
    """Rank (tp 0)'s ids on every rank of the tp group."""
    if ps.tp_size > 1:
        dist.broadcast(ids, src=ps.tp_group_ranks[0], group=ps.tp_group)
    return ids


@torch.no_grad()
def generate_tokens(model, prompt: Tensor, max_new_tokens: int, sampling: SamplingConfig, *,
                    eod: int | None = None, generator: torch.Generator | None = None,
                    use_cache: bool = True, keep_logits: bool = False,
                    vocab_size: int | None = None) -> GenerationOutput:
    """Continue ``prompt`` [b, s] (token ids, every row the same length) by up to
    ``max_new_tokens`` tokens.

    model: a whole :class:`~megalite.model.gpt.GPTModel` (pre and post process; any tp size,
        no sequence parallelism), in eval mode. Every tp rank calls this with the same prompt,
        sampling config and an equally seeded ``generator`` (on the model's device).
    eod: stop a row once it produces this id; the loop ends when every row has.
    vocab_size: choose only ids below this (1 <= vocab_size <= the model's unpadded
        ``config.vocab_size``; default: the latter). Padding columns are never chosen.
    The prompt plus the new tokens must fit ``max_position_embeddings``.
    """
    if not (model.pre_process and model.post_process):
        raise MegaliteError("generation needs the whole model on each rank (pipeline size 1)")
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise MegaliteError(f"prompt must be token ids [batch, seq >= 1], got "
                            f"{tuple(prompt.shape)}")
    if max_new_tokens < 0:
        raise MegaliteError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    model_vocab = model.config.vocab_size
    vocab = model_vocab if vocab_size is None else vocab_size
    if not 1 <= vocab <= model_vocab:
        raise MegaliteError(f"vocab_size={vocab} must be in [1, {model_vocab}] (the model's "
                            f"vocab_size)")
    if prompt.numel() and not 0 <= int(prompt.min()) <= int(prompt.max()) < model_vocab:
        raise MegaliteError(f"prompt ids must be in [0, {model_vocab}) (the model's vocab_size), "
                            f"got {int(prompt.min())}..{int(prompt.max())}")
    if eod is not None and not 0 <= eod < vocab:
        raise MegaliteError(f"eod={eod} is outside the vocabulary [0, {vocab})")
    device = next(model.parameters()).device
    b, s = prompt.shape
    total = s + max_new_tokens
    limit = model.config.max_position_embeddings
    if total > limit:
        raise MegaliteError(f"prompt ({s} tokens) + {max_new_tokens} new tokens exceed "
                            f"max_position_embeddings={limit}")
    seq = prompt.to(device=device, dtype=torch.long)
    cache = KVCache.for_model(model, b, total) if use_cache and max_new_tokens else None
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    new: list[Tensor] = []
    kept: list[Tensor] = []
    step_input = seq
    for _ in range(max_new_tokens):
        if cache is not None:
            local = model(step_input, kv_cache=cache)[:, -1]     # [b, Vp/tp]
        else:
            local = model(seq)[:, -1]
        logits = full_vocab_logits(local, model)[:, :vocab]       # [b, vocab]
        ids = _agree_on_tokens(sample_next(logits, sampling, generator), model.ps)
        if eod is not None:
            ids = torch.where(finished, torch.full_like(ids, eod), ids)
            finished |= ids == eod
        new.append(ids)
        if keep_logits:
            kept.append(logits.cpu())
        seq = torch.cat([seq, ids[:, None]], dim=1)
        step_input = ids[:, None]
        if eod is not None and bool(finished.all()):
            break
    tokens = torch.stack(new, dim=1).cpu() if new else torch.empty(b, 0, dtype=torch.long)
    return GenerationOutput(tokens=tokens, logits=kept, finished=finished.cpu())
