"""Which layers each pipeline stage holds, and the model chunks that hold them.

A pipeline of ``pp`` stages splits the ``num_layers`` transformer layers into contiguous blocks.
The first stage also holds the embedding, the last one the final norm and the output layer.

Interleaved pipelines (``vp`` virtual stages per rank) cut the layers into ``pp * vp`` blocks;
*virtual stage* ``v = chunk * pp + pp_rank`` holds block ``v``, so each rank holds ``vp``
non-adjacent chunks and an activation visits every rank ``vp`` times. Example, 8 layers,
pp = 2, vp = 2 (two layers per virtual stage)::

    rank 0: chunk 0 = layers [0, 2)   chunk 1 = layers [4, 6)
    rank 1: chunk 0 = layers [2, 4)   chunk 1 = layers [6, 8)

The embedding sits in (rank 0, chunk 0), the output layer in (last rank, last chunk).
"""
from __future__ import annotations

from torch import nn

from megalite.errors import MegaliteError
from megalite.families import family_of
from megalite.model.config import TransformerConfig
from megalite.parallel.context import ModelContext

__all__ = ["layer_ranges", "build_model_chunks"]


def layer_ranges(num_layers: int, pp_size: int, vp_size: int = 1,
                 split: list[int] | None = None) -> list[list[tuple[int, int]]]:
    """Global layer range ``[a, b)`` of every chunk: ``result[pp_rank][chunk]``.

    Args:
        num_layers: transformer layers of the whole model.
        pp_size: pipeline stages (``--pipeline-model-parallel-size``).
        vp_size: chunks per stage (virtual pipeline size); 1 = not interleaved.
        split: explicit layers per stage (length ``pp_size``, summing to ``num_layers``; each
            >= 0), e.g. ``[3, 4, 4, 3]`` to give the stages holding the embedding and the output
            layer fewer layers. Only without interleaving. None: an even split.

    Raises MegaliteError (naming the flag) when the layers cannot be split that way.
    """
    for name, value in (("--num-layers", num_layers),
                        ("--pipeline-model-parallel-size", pp_size),
                        ("virtual pipeline size", vp_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise MegaliteError(f"{name} must be a positive integer, got {value!r}")
    if split is not None:
        if vp_size != 1:
            raise MegaliteError("--pipeline-layer-split cannot be combined with "
                                "--num-layers-per-virtual-pipeline-stage (interleaved stages "
                                "are always even)")
        split = list(split)
        if len(split) != pp_size:
            raise MegaliteError(f"--pipeline-layer-split {split} has {len(split)} entries; "
                                f"--pipeline-model-parallel-size is {pp_size}")
        if any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in split):
            raise MegaliteError(f"--pipeline-layer-split {split}: every entry must be an "
                                f"integer >= 0")
        if sum(split) != num_layers:
            raise MegaliteError(f"--pipeline-layer-split {split} sums to {sum(split)}, but "
                                f"--num-layers is {num_layers}")
        bounds, start = [], 0
        for n in split:
            bounds.append([(start, start + n)])
            start += n
        return bounds
    if vp_size > 1 and pp_size == 1:
        raise MegaliteError("--num-layers-per-virtual-pipeline-stage needs "
                            "--pipeline-model-parallel-size > 1")
    blocks = pp_size * vp_size
    if num_layers % blocks:
        what = (f"--pipeline-model-parallel-size {pp_size}" if vp_size == 1 else
                f"--pipeline-model-parallel-size {pp_size} x {vp_size} virtual stages")
        raise MegaliteError(f"--num-layers {num_layers} is not divisible by {what}; choose "
                            f"sizes that divide it" + (" or give --pipeline-layer-split"
                                                       if vp_size == 1 else ""))
    per = num_layers // blocks
    return [[((c * pp_size + r) * per, (c * pp_size + r + 1) * per) for c in range(vp_size)]
            for r in range(pp_size)]


def build_model_chunks(config: TransformerConfig, ctx: ModelContext, vp_size: int = 1,
                       split: list[int] | None = None) -> list[nn.Module]:
    """This rank's model chunks, one per virtual stage (``vp_size`` of them): the model class
    of ``config``'s family (:mod:`megalite.families`; GPT: :class:`~megalite.model.gpt.
    GPTModel`), built with ``ctx`` (this rank's layout, dropout streams, device, dtype).

    ``pre_process`` (embedding) only on (pp_rank 0, chunk 0), ``post_process`` (final norm,
    output layer, loss) only on (last pp_rank, last chunk). With tied embeddings and pp > 1 the
    last stage holds its own copy of the word embedding as ``output_layer`` (marked
    ``shared_embedding``, initialized equal); :func:`megalite.parallel.grad_sync.
    allreduce_embedding_grads` keeps the two copies equal. Parameters are uninitialized: call
    ``init_weights(seed)`` on each chunk (layout-independent, so every split sees the same
    model). All chunks share ``ctx.rng_tracker``. An encoder-decoder (T5) is one chunk: it
    has no pipeline-parallel implementation, so pp > 1 (or virtual stages) is refused.
    """
    ps = ctx.ps
    model_class = family_of(config).model_class
    if config.is_encoder_decoder and (ps.pp_size > 1 or vp_size > 1 or split is not None):
        raise MegaliteError(
            f"--pipeline-model-parallel-size {ps.pp_size}: the encoder-decoder (T5) model is "
            f"not implemented with pipeline parallelism (Megatron splits its encoder and "
            f"decoder into stages; megalite does not); use size 1 and tensor/data parallelism")
    ranges = layer_ranges(config.num_layers, ps.pp_size, vp_size, split)[ps.pp_rank]
    last_chunk = len(ranges) - 1
    return [model_class(config, ctx,
                     pre_process=ps.is_first_pp_stage and c == 0,
                     post_process=ps.is_last_pp_stage and c == last_chunk,
                     layer_range=rng)
            for c, rng in enumerate(ranges)]
