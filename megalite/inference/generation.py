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

Encoder-decoder models (:func:`generate_seq2seq_tokens`): the prompt is the encoder's input,
encoded once; the decoder generates from the decoder start id with the same per-step choice.
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

__all__ = ["GenerationOutput", "generate_tokens", "generate_seq2seq_tokens", "full_vocab_logits"]


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


def _check_vocab(model, vocab_size: int | None, eod: int | None) -> int:
    """The ids to choose from (``vocab_size`` checked against the model's; see
    :func:`generate_tokens`)."""
    model_vocab = model.config.vocab_size
    vocab = model_vocab if vocab_size is None else vocab_size
    if not 1 <= vocab <= model_vocab:
        raise MegaliteError(f"vocab_size={vocab} must be in [1, {model_vocab}] (the model's "
                            f"vocab_size)")
    if eod is not None and not 0 <= eod < vocab:
        raise MegaliteError(f"eod={eod} is outside the vocabulary [0, {vocab})")
    return vocab


def _check_ids(ids: Tensor, model, what: str) -> None:
    if ids.dim() != 2 or ids.shape[1] < 1:
        raise MegaliteError(f"{what} must be token ids [batch, seq >= 1], got "
                            f"{tuple(ids.shape)}")
    model_vocab = model.config.vocab_size
    if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < model_vocab:
        raise MegaliteError(f"{what} ids must be in [0, {model_vocab}) (the model's vocab_size), "
                            f"got {int(ids.min())}..{int(ids.max())}")


class _Decoding:
    """The token choice of every step, shared by both loops: logits gathered over tp, cut to
    ``vocab``, a token sampled and agreed on, rows ended at ``eod`` kept at ``eod``."""

    def __init__(self, model, batch: int, vocab: int, sampling: SamplingConfig, eod, generator,
                 keep_logits: bool, device):
        self.model, self.vocab, self.sampling, self.eod = model, vocab, sampling, eod
        self.generator, self.keep_logits = generator, keep_logits
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.new: list[Tensor] = []
        self.kept: list[Tensor] = []
        self.batch = batch

    def choose(self, local: Tensor) -> Tensor:
        """This rank's last-position logits [b, Vp/tp] -> the next ids [b] (same on all ranks)."""
        logits = full_vocab_logits(local, self.model)[:, :self.vocab]       # [b, vocab]
        ids = _agree_on_tokens(sample_next(logits, self.sampling, self.generator), self.model.ps)
        if self.eod is not None:
            ids = torch.where(self.finished, torch.full_like(ids, self.eod), ids)
            self.finished |= ids == self.eod
        self.new.append(ids)
        if self.keep_logits:
            self.kept.append(logits.cpu())
        return ids

    def loop(self, seq: Tensor, max_new_tokens: int, last_logits) -> GenerationOutput:
        """From ``seq`` [b, s], up to ``max_new_tokens`` steps of ``last_logits(new ids [b, n],
        whole sequence [b, s + i])`` -> this rank's logits [b, Vp/tp] of the last position
        (with a cache the model reads only the new ids), each followed by :meth:`choose`."""
        new = seq
        for _ in range(max_new_tokens):
            ids = self.choose(last_logits(new, seq))
            seq = torch.cat([seq, ids[:, None]], dim=1)
            new = ids[:, None]
            if self.eod is not None and bool(self.finished.all()):
                break
        return self.output()

    def output(self) -> GenerationOutput:
        tokens = (torch.stack(self.new, dim=1).cpu() if self.new
                  else torch.empty(self.batch, 0, dtype=torch.long))
        return GenerationOutput(tokens=tokens, logits=self.kept, finished=self.finished.cpu())


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
    _check_ids(prompt, model, "prompt")
    if max_new_tokens < 0:
        raise MegaliteError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    vocab = _check_vocab(model, vocab_size, eod)
    device = next(model.parameters()).device
    b, s = prompt.shape
    total = s + max_new_tokens
    limit = model.config.max_position_embeddings
    if total > limit:
        raise MegaliteError(f"prompt ({s} tokens) + {max_new_tokens} new tokens exceed "
                            f"max_position_embeddings={limit}")
    seq = prompt.to(device=device, dtype=torch.long)
    cache = KVCache.for_model(model, b, total) if use_cache and max_new_tokens else None
    step = _Decoding(model, b, vocab, sampling, eod, generator, keep_logits, device)

    def last_logits(new: Tensor, whole: Tensor) -> Tensor:              # -> [b, Vp/tp]
        return (model(new, kv_cache=cache) if cache is not None else model(whole))[:, -1]
    return step.loop(seq, max_new_tokens, last_logits)


@torch.no_grad()
def generate_seq2seq_tokens(model, source: Tensor, max_new_tokens: int,
                            sampling: SamplingConfig, *, start: int, eod: int | None = None,
                            generator: torch.Generator | None = None, use_cache: bool = True,
                            keep_logits: bool = False, vocab_size: int | None = None,
                            source_mask: Tensor | None = None) -> GenerationOutput:
    """Decode up to ``max_new_tokens`` tokens from an encoder-decoder ``model``
    (:class:`~megalite.model.encoder_decoder.EncoderDecoderModel`, any tp size, no sequence
    parallelism, eval mode) for the source ids ``source`` [b, t] (``source_mask`` [b, t]: 1
    for a token, 0 for padding; None: all tokens).

    The source is encoded once; the decoder starts from ``start`` (the decoder start id) and
    feeds back each chosen token, its self-attention keys/values in a KV cache and its
    cross-attention keys/values computed from the encoder output by the first step and reused
    (``use_cache=False``: the whole decoder sequence again every step, the reference). The
    other arguments and the output as :func:`generate_tokens`.
    """
    _check_ids(source, model, "source")
    if max_new_tokens < 0:
        raise MegaliteError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    vocab = _check_vocab(model, vocab_size, eod)
    if not 0 <= start < model.config.vocab_size:
        raise MegaliteError(f"decoder start id {start} is outside the model's vocabulary "
                            f"[0, {model.config.vocab_size})")
    cfg = model.config
    if cfg.position_embedding_type != "relative" and max_new_tokens > cfg.max_position_embeddings:
        raise MegaliteError(f"{max_new_tokens} new tokens exceed the decoder's "
                            f"max_position_embeddings={cfg.max_position_embeddings}")
    device = next(model.parameters()).device
    b = source.shape[0]
    source = source.to(device=device, dtype=torch.long)
    mask = None if source_mask is None else source_mask.to(device)
    memory = model.encode(source, mask)                                  # [t, b, h]
    cache = KVCache.for_model(model, b, max_new_tokens) if use_cache and max_new_tokens else None
    step = _Decoding(model, b, vocab, sampling, eod, generator, keep_logits, device)

    def last_logits(new: Tensor, whole: Tensor) -> Tensor:              # -> [b, Vp/tp]
        if cache is not None:
            return model.decode(new, memory, mask, kv_cache=cache)[:, -1]
        return model.decode(whole, memory, mask)[:, -1]
    return step.loop(torch.full((b, 1), start, dtype=torch.long, device=device),
                     max_new_tokens, last_logits)
