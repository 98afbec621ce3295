"""The models' weights (every family): parameter names, materialization, layout-independent init, and full
(unsharded) state dicts in and out.

Parameter names are full-model names with global layer ids (``layers.7.mlp.linear_fc1.weight``
on whichever pipeline stage holds layer 7; ``encoder.layers.7.`` / ``decoder.layers.7.`` in
encoder-decoder models), the same in checkpoints, resharding and the Hugging
Face name maps; the constants below are their one spelling (the attribute names of the modules
in :mod:`megalite.model.gpt`, :mod:`~megalite.model.bert`, :mod:`~megalite.model.transformer`,
:mod:`~megalite.model.attention` and :mod:`~megalite.model.mlp`).

Lifecycle: :class:`~megalite.model.gpt.GPTModel` builds every module on the meta device (no
memory, nothing drawn) and :func:`materialize` allocates this rank's shards uninitialized; then
either :func:`init_weights` draws each full tensor once from a generator seeded by ``(seed,
name)`` and keeps this rank's shard, or :func:`load_full_state_dict` / a checkpoint fills them.
Peak extra host memory while initializing is one full tensor in fp32 (the largest is the
vocabulary matrix, ``[padded_vocab, h]``), never the model.

Vocabulary matrices ([padded_vocab, h], and BERT's output bias [padded_vocab]:
:data:`VOCAB_TENSORS`) are padded to a multiple that
depends on the TP size; their ``vocab_size`` real rows carry the weights and the padding rows
are zero (:func:`fit_vocab_rows`), so full tensors agree across layouts.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from megalite.errors import MegaliteError
from megalite.model.positions import SinusoidalPositions
from megalite.parallel.sharding import (full_shape, gather_full_tensor, init_parameter_,
                                        shard_tensor, sharding_of)

__all__ = ["WORD_EMBEDDINGS", "POSITION_EMBEDDINGS", "OUTPUT_LAYER", "OUTPUT_BIAS",
           "VOCAB_TENSORS", "FINAL_NORM", "TOKENTYPE_EMBEDDINGS", "EMBEDDING_NORM",
           "LM_HEAD_DENSE", "LM_HEAD_NORM", "POOLER", "BINARY_HEAD", "INPUT_NORM",
           "POST_ATTENTION_NORM", "LINEAR_QKV", "LINEAR_PROJ", "Q_LAYERNORM", "K_LAYERNORM",
           "LINEAR_FC1", "LINEAR_FC2",
           "ENCODER", "DECODER", "RELATIVE_POSITION_BIAS", "CROSS_ATTENTION_NORM",
           "CROSS_LINEAR_Q", "CROSS_LINEAR_KV", "CROSS_LINEAR_PROJ", "layer_prefix",
           "fit_vocab_rows",
           "to_empty_keeping_attributes", "materialize", "init_weights", "full_state_dict",
           "load_full_state_dict"]

# -- parameter names ------------------------------------------------------------------------------
WORD_EMBEDDINGS = "embedding.word_embeddings.weight"
"""[padded_vocab, h]; also the name under which a tied output layer held away from the embedding
(a pipeline's last stage, ``shared_embedding``) is initialized, so both copies start equal."""
POSITION_EMBEDDINGS = "embedding.position_embeddings.weight"
"""[max_position_embeddings, h], learned absolute positions only."""
OUTPUT_LAYER = "output_layer.weight"
"""[padded_vocab, h]: untied output layer, or the last stage's copy of a tied embedding."""
OUTPUT_BIAS = "lm_head.output_bias"
"""[padded_vocab]: BERT's masked-LM output bias."""
VOCAB_TENSORS = (WORD_EMBEDDINGS, OUTPUT_LAYER, OUTPUT_BIAS)
FINAL_NORM = "final_norm"
# BERT's own modules (each with .weight and .bias): the token-type table and the post-norm
# embedding norm, the masked-LM head's transform, the pooler and the binary head.
TOKENTYPE_EMBEDDINGS = "embedding.tokentype_embeddings.weight"
EMBEDDING_NORM = "embedding.norm"
LM_HEAD_DENSE = "lm_head.dense"
LM_HEAD_NORM = "lm_head.norm"
POOLER = "pooler"
BINARY_HEAD = "binary_head"
# Modules of transformer layer i, under layer_prefix(i); each has ``.weight`` and maybe ``.bias``.
INPUT_NORM = "input_norm"
LINEAR_QKV = "attention.linear_qkv"
LINEAR_PROJ = "attention.linear_proj"
Q_LAYERNORM, K_LAYERNORM = "attention.q_layernorm", "attention.k_layernorm"   # qk_layernorm
POST_ATTENTION_NORM = "post_attention_norm"
LINEAR_FC1 = "mlp.linear_fc1"
LINEAR_FC2 = "mlp.linear_fc2"
# Encoder-decoder models: the stacks' prefixes (layer i of the encoder is ``encoder.layers.i.``),
# each stack's relative position bias, and the decoder layers' cross-attention modules.
ENCODER, DECODER = "encoder.", "decoder."
RELATIVE_POSITION_BIAS = "relative_position_bias.weight"
CROSS_ATTENTION_NORM = "cross_attention_norm"
CROSS_LINEAR_Q = "cross_attention.linear_q"
CROSS_LINEAR_KV = "cross_attention.linear_kv"
CROSS_LINEAR_PROJ = "cross_attention.linear_proj"
# The linears writing into the residual stream: drawn with std / sqrt(2 L) (the suffix also
# matches the cross-attention's output projection).
# "linear_fc2.weight" also matches the MoE experts' and shared experts' second linears.
_RESIDUAL_OUTPUTS = (LINEAR_PROJ + ".weight", "linear_fc2.weight")


def layer_prefix(i: int) -> str:
    """``"layers.{i}."``: the prefix of global layer ``i``'s parameter names."""
    return f"layers.{i}."


def fit_vocab_rows(full: Tensor, rows: int, vocab_size: int, name: str) -> Tensor:
    """Vocabulary matrix ``full`` [n, h] with ``rows`` rows: the ``vocab_size`` real rows copied,
    padding rows zero (``full`` itself when it already has ``rows`` rows)."""
    if full.shape[0] == rows:
        return full
    if full.shape[0] < vocab_size:
        raise MegaliteError(f"{name}: {full.shape[0]} rows (full shape {tuple(full.shape)}), "
                            f"fewer than vocab_size={vocab_size}")
    out = full.new_zeros((rows, *full.shape[1:]))
    out[:vocab_size] = full[:vocab_size]
    return out


# -- lifecycle ------------------------------------------------------------------------------------
def to_empty_keeping_attributes(module: nn.Module, device, recurse: bool = True) -> nn.Module:
    """``nn.Module.to_empty`` keeping the parameters' sharding attributes.

    Moving off the meta device makes torch create new Parameter objects, which would drop
    ``tensor_parallel_dim`` / ``partition_stride`` / ``sequence_parallel`` /
    ``shared_embedding``; they are copied over.
    """
    saved = {n: dict(vars(p)) for n, p in module.named_parameters()}
    nn.Module.to_empty(module, device=device, recurse=recurse)
    for n, p in module.named_parameters():
        for key, value in saved.get(n, {}).items():
            if not hasattr(p, key):
                setattr(p, key, value)
    return module


def _reset_fixed_buffers(model: nn.Module) -> None:
    # The sinusoidal table is computed, never loaded: after to_empty it holds garbage.
    for m in model.modules():
        if isinstance(m, SinusoidalPositions):
            m.reset()


def materialize(model: nn.Module, device) -> nn.Module:
    """Allocate a meta-device model's parameters on ``device`` (uninitialized, sharding
    attributes kept) and compute its fixed buffers; returns ``model``."""
    to_empty_keeping_attributes(model, device)
    _reset_fixed_buffers(model)
    return model


def init_weights(model: nn.Module, seed: int) -> None:
    """Megatron-style init of a model (chunk), identical full weights for every TP layout.

    Weight matrices ~ N(0, init_method_std); the attention output projection and the second
    MLP linear (the ones writing into the residual stream) ~ N(0, std / sqrt(2 L)); biases
    0; norm weights 1 (every other matrix, e.g. BERT's token types and heads, N(0, std)). Each full tensor is drawn from a generator seeded by (seed, name),
    then sharded, so TP=1, 2, 4, 8 see the same full model. Vocabulary matrices draw only
    their ``vocab_size`` real rows (padding rows are zero), so they agree across layouts
    whose padding differs. ``model`` has ``config`` and ``ps``; on the meta device nothing
    happens. Also recomputes the fixed sinusoidal table.
    """
    _reset_fixed_buffers(model)
    config = model.config
    std = config.init_method_std
    out_std = std / math.sqrt(2.0 * config.num_layers)
    vocab = config.vocab_size

    def normal(sigma):
        return lambda t, g: t.normal_(0.0, sigma, generator=g)

    def vocab_normal(t, g):
        t.zero_()
        t[:vocab].normal_(0.0, std, generator=g)

    for name, p in model.named_parameters():
        shared = getattr(p, "shared_embedding", False)
        if name.endswith("bias"):
            fn = lambda t, g: t.zero_()  # noqa: E731
        elif "norm" in name:
            fn = lambda t, g: t.fill_(1.0)  # noqa: E731
        elif name in VOCAB_TENSORS:
            fn = vocab_normal
        elif name.endswith(_RESIDUAL_OUTPUTS):
            fn = normal(out_std)
        else:
            fn = normal(std)
        init_parameter_(p, fn, seed, WORD_EMBEDDINGS if shared else name, model.ps)


@torch.no_grad()
def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter of ``model`` gathered to its full shape (a collective over the tp group:
    all tp ranks must call it); full tensors on every tp rank, CPU copies."""
    return {n: gather_full_tensor(p.detach(), p, model.ps).cpu()
            for n, p in model.named_parameters()}


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy this rank's shard of each full tensor in ``state`` into ``model``'s parameters.

    Raises MegaliteError naming missing/unexpected names or a wrong full shape. Vocabulary
    matrices may come with any padding (e.g. from Hugging Face: none): the ``vocab_size`` real
    rows are copied and the padding rows set to zero.
    """
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise MegaliteError(f"state dict does not match the model: missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}")
    tp = model.ps.tp_size
    for name, p in params.items():
        full = state[name]
        dim, stride = sharding_of(p)
        shape = list(full_shape(p, tp))
        if name in VOCAB_TENSORS:
            full = fit_vocab_rows(full, shape[0], model.config.vocab_size, name)
        if list(full.shape) != shape:
            raise MegaliteError(f"{name}: full shape {tuple(full.shape)}, model expects "
                                f"{tuple(shape)}")
        p.copy_(shard_tensor(full, dim, stride, model.ps.tp_rank, tp))
