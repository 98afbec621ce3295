"""The GPT model family: one decoder-only transformer, two recipes, any tensor-parallel layout.

    x_0    = dropout(E[ids] + P)                      E: word embedding, P: learned/sinusoidal
    x'_l   = x_l  + dropout(Attention(Norm(x_l)))     (rotary positions inside attention)
    x_l+1  = x'_l + dropout(MLP(Norm(x'_l)))
    logits = Norm(x_L) W_out^T                        W_out = E when tied

Layout. Activations inside the transformer are sequence-first, [s, b, h]; with sequence
parallelism every rank holds [s/tp, b, h] between the blocks (norms, dropout and residual adds
act on the shard; the attention/MLP linears all-gather before and reduce-scatter after). The
vocabulary is padded to ``config.padded_vocab(tp)`` and split in row blocks of
``padded/tp`` over the tensor-parallel ranks (embedding and output layer alike).

Padding rows are never predicted: their logits are set to the most negative finite value of
the dtype (``torch.finfo(dtype).min``), in the returned logits and in the loss. Softmax gives
them probability exactly 0 (exp underflows) and their gradient is exactly 0; a finite value
rather than -inf keeps ``0 * logit`` free of NaN in any downstream masking. They are initialized
to zero and stay zero.

Dropout RNG: dropout on tensors split across tensor-parallel ranks (attention probabilities;
with SP also the embedding and residual-branch dropout) draws from the tracker's
"model-parallel" stream, so masks differ per rank; dropout on replicated tensors uses the default
generator, identical on all tensor-parallel ranks, so the replicas stay equal.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megalite.distributed.parallel_state import ParallelState
from megalite.errors import MegaliteError
from megalite.model.attention import Attention
from megalite.model.config import GPTConfig, padded_vocab_size
from megalite.model.mlp import MLP
from megalite.model.norms import build_norm, mark_replicated
from megalite.model.positions import RotaryEmbedding, SinusoidalPositions
from megalite.parallel.comm import reduce_scatter_to_sequence_parallel_region
from megalite.parallel.cross_entropy import vocab_parallel_cross_entropy
from megalite.parallel.layers import (ColumnParallelLinear, VocabParallelEmbedding,
                                      gather_full_tensor, init_parameter_, parallel_lm_logits,
                                      shard_tensor)
from megalite.parallel.random import TP_SEED_OFFSET, RNGStatesTracker, checkpoint

__all__ = ["GPTModel", "padded_vocab_size"]

# Name under which a tied output layer held away from the embedding (a pipeline's last stage)
# is initialized, so that both copies start equal.
_WORD_EMBEDDINGS = "embedding.word_embeddings.weight"


def _dropout(x: Tensor, p: float, training: bool, tracker: RNGStatesTracker, split: bool) -> Tensor:
    """Dropout drawing from the "model-parallel" stream when ``x`` is split across tp ranks."""
    if not training or p == 0.0:
        return x
    with tracker.fork() if split else contextlib.nullcontext():
        return F.dropout(x, p, training=True)


class Embedding(nn.Module):
    """Token (+ absolute position) embedding: ``forward(ids [b, s]) -> [s, b, h]``
    ([s/tp, b, h] with sequence parallelism).

    With sequence parallelism the vocabulary-parallel partial sums are reduce-scattered along the
    sequence (instead of all-reduced), and each rank adds the positions of its own sequence
    slice; the learned position table then sees only those rows, so its gradient is partial and
    it is marked ``sequence_parallel`` (summed over tp by the trainer, like the norms).
    """

    def __init__(self, config: GPTConfig, ps: ParallelState, rng_tracker: RNGStatesTracker,
                 device=None, dtype=None):
        super().__init__()
        self.config, self.ps, self.rng_tracker = config, ps, rng_tracker
        self.sp = config.sequence_parallel and ps.tp_size > 1
        h = config.hidden_size
        self.word_embeddings = VocabParallelEmbedding(config.padded_vocab(ps.tp_size), h, ps=ps,
                                                      reduce_output=not self.sp, device=device,
                                                      dtype=dtype)
        kind = config.position_embedding_type
        if kind == "learned_absolute":
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, h,
                                                    device=device, dtype=dtype)
            mark_replicated(self.position_embeddings, sequence_parallel=self.sp)
        elif kind == "sinusoidal":
            self.sinusoidal = SinusoidalPositions(config.max_position_embeddings, h, device=device)

    def forward(self, input_ids: Tensor, position_offset: int = 0) -> Tensor:
        """``position_offset``: absolute position of ``input_ids[:, 0]`` (tokens already in an
        inference KV cache; 0 in training)."""
        s = input_ids.shape[1]
        x = self.word_embeddings(input_ids).transpose(0, 1).contiguous()   # [s, b, h]
        positions = torch.arange(position_offset, position_offset + s, device=input_ids.device)
        if self.sp:
            x = reduce_scatter_to_sequence_parallel_region(x, self.ps)     # [s/tp, b, h]
            local = s // self.ps.tp_size
            positions = positions[self.ps.tp_rank * local:(self.ps.tp_rank + 1) * local]
        kind = self.config.position_embedding_type
        if kind == "learned_absolute":
            x = x + self.position_embeddings(positions)[:, None, :]
        elif kind == "sinusoidal":
            x = x + self.sinusoidal.table[positions][:, None, :].to(x.dtype)
        return _dropout(x, self.config.hidden_dropout, self.training, self.rng_tracker,
                        split=self.sp)


class TransformerLayer(nn.Module):
    """Pre-norm block: ``forward(x [s, b, h], cos=None, sin=None, kv_cache=None) -> [s, b, h]``."""

    def __init__(self, config: GPTConfig, ps: ParallelState, rng_tracker: RNGStatesTracker,
                 device=None, dtype=None):
        super().__init__()
        self.hidden_dropout = config.hidden_dropout
        self.split = config.sequence_parallel and ps.tp_size > 1
        self.rng_tracker = rng_tracker
        self.input_norm = build_norm(config, device, dtype)
        self.attention = Attention(config, ps, rng_tracker, device, dtype)
        self.post_attention_norm = build_norm(config, device, dtype)
        self.mlp = MLP(config, ps, device, dtype)

    def forward(self, x: Tensor, cos: Tensor | None = None, sin: Tensor | None = None,
                kv_cache=None) -> Tensor:
        rope = None if cos is None else (cos, sin)
        x = x + self._drop(self.attention(self.input_norm(x), rope, kv_cache))
        return x + self._drop(self.mlp(self.post_attention_norm(x)))

    def _drop(self, t: Tensor) -> Tensor:
        return _dropout(t, self.hidden_dropout, self.training, self.rng_tracker, self.split)


class GPTModel(nn.Module):
    """GPT model (or the slice of it one pipeline stage holds), tensor/sequence parallel.

    Args:
        config: model shapes and recipe.
        ps: this rank's parallel layout (only ``tp_*`` is used here).
        pre_process: hold the embedding (first pipeline stage).
        post_process: hold the final norm and the output layer (last pipeline stage).
        layer_range: global ids ``[a, b)`` of the layers held here (default: all). Parameter
            names use global ids (``layers.7.mlp...``) on every stage.
        device: where to create parameters (``"meta"`` to inspect shapes without memory).
        dtype: parameter dtype (default torch's default, float32). Init is drawn in float32
            and cast, so a bf16 model holds the rounded float32 weights.
        rng_tracker: dropout RNG streams, normally ``model_parallel_seed(seed, ps)`` from the
            trainer; by default a private tracker whose "model-parallel" stream is seeded
            ``TP_SEED_OFFSET + tp_rank`` (enough for dropout-free use and tests).

    Parameters are uninitialized until :meth:`init_weights` (or a state dict) fills them.
    """

    def __init__(self, config: GPTConfig, ps: ParallelState, *, pre_process: bool = True,
                 post_process: bool = True, layer_range: tuple[int, int] | None = None,
                 device=None, dtype=None, rng_tracker: RNGStatesTracker | None = None):
        super().__init__()
        config.validate()
        config.validate_parallel(ps.tp_size)
        lo, hi = layer_range if layer_range is not None else (0, config.num_layers)
        if not 0 <= lo <= hi <= config.num_layers:
            raise MegaliteError(f"layer_range {layer_range} is not within [0, "
                                f"{config.num_layers}] (num_layers)")
        if rng_tracker is None:
            rng_tracker = RNGStatesTracker()
            rng_tracker.add("model-parallel", TP_SEED_OFFSET + ps.tp_rank)
        self.config, self.ps, self.rng_tracker = config, ps, rng_tracker
        self.pre_process, self.post_process, self.layer_range = pre_process, post_process, (lo, hi)
        self.padded_vocab = config.padded_vocab(ps.tp_size)
        self.sequence_parallel = config.sequence_parallel and ps.tp_size > 1

        if pre_process:
            self.embedding = Embedding(config, ps, rng_tracker, device, dtype)
        self.rotary = (RotaryEmbedding.from_config(config)
                       if config.position_embedding_type == "rope" else None)
        # A ModuleDict keyed by the global layer id keeps state-dict names stage-independent.
        self.layers = nn.ModuleDict({
            str(i): TransformerLayer(config, ps, rng_tracker, device, dtype)
            for i in range(lo, hi)})
        if post_process:
            self.final_norm = build_norm(config, device, dtype)
            if not config.tied_embeddings or not pre_process:
                # Untied output layer, or the last stage's copy of a tied embedding (kept equal
                # to the first stage's by the pipeline's embedding-group all-reduce).
                self.output_layer = ColumnParallelLinear(
                    config.hidden_size, self.padded_vocab, ps=ps, bias=False,
                    gather_output=False, sequence_parallel=self.sequence_parallel, device=device,
                    dtype=dtype)
                self.output_layer.weight.shared_embedding = config.tied_embeddings

    # ---- forward ---------------------------------------------------------------------------
    def forward(self, inputs: Tensor, labels: Tensor | None = None, *, kv_cache=None) -> Tensor:
        """Run this model (slice).

        inputs: token ids [b, s] when ``pre_process``; else the previous stage's hidden states
            [s, b, h] ([s/tp, b, h] with sequence parallelism).
        labels: target ids [b, s] (global vocabulary ids < vocab_size) or None.

        Returns, when ``post_process``: the logits of this rank's vocabulary slice
        [b, s, padded_vocab/tp] (padding columns masked, see module doc) if ``labels`` is None,
        else the per-token cross-entropy [b, s] (fp32, identical on all tp ranks; computed
        without gathering the logits). Without ``post_process``: hidden states [s, b, h]
        ([s/tp, b, h] with SP).

        kv_cache: inference only (:class:`megalite.inference.kv_cache.KVCache`, one per model
            chunk): the s tokens sit at absolute positions ``kv_cache.offset ..`` and attend to
            every cached token; their keys/values are appended and the offset advanced by s.
            Not with sequence parallelism.
        """
        tp = self.ps.tp_size
        offset = 0
        if kv_cache is not None:
            if self.sequence_parallel:
                raise MegaliteError("a KV cache (inference) cannot be used with sequence "
                                    "parallelism; build the model with sequence_parallel=False")
            offset = kv_cache.offset
        if self.pre_process:
            if inputs.dim() != 2:
                raise MegaliteError(f"GPTModel expects token ids [batch, seq], got shape "
                                    f"{tuple(inputs.shape)}")
            s = inputs.shape[1]
            self._check_seq(offset + s)
            x = self.embedding(inputs, offset)
        else:
            x = inputs
            s = x.shape[0] * (tp if self.sequence_parallel else 1)
            self._check_seq(offset + s)
        cos = sin = None
        if self.rotary is not None:
            cos, sin = self.rotary(offset + s, device=x.device)
            cos, sin = cos[offset:], sin[offset:]             # the angles of positions offset..
        full_recompute = self.config.recompute_granularity == "full" and torch.is_grad_enabled()
        for i, layer in self.layers.items():
            if full_recompute and kv_cache is None:
                args = (x,) if cos is None else (x, cos, sin)
                x = checkpoint(layer, self.rng_tracker, *args)
            else:
                x = layer(x, cos, sin, None if kv_cache is None else kv_cache.layer(int(i)))
        if kv_cache is not None:
            kv_cache.advance(s)
        if not self.post_process:
            return x
        logits = self._logits(self.final_norm(x))               # [s, b, Vp/tp]
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        if labels.shape != logits.shape[1::-1]:
            raise MegaliteError(f"labels shape {tuple(labels.shape)} does not match the tokens "
                                f"[batch, seq] = {list(logits.shape[1::-1])}")
        loss = vocab_parallel_cross_entropy(logits, labels.transpose(0, 1), self.ps)  # [s, b]
        return loss.transpose(0, 1).contiguous()

    def _check_seq(self, s: int) -> None:
        if s > self.config.max_position_embeddings:
            raise MegaliteError(f"sequence length {s} exceeds max_position_embeddings="
                                f"{self.config.max_position_embeddings}")
        if self.sequence_parallel and s % self.ps.tp_size:
            raise MegaliteError(f"--sequence-parallel needs the sequence length ({s}) divisible "
                                f"by the tensor-parallel size ({self.ps.tp_size})")

    def output_weight(self) -> Tensor:
        """This rank's [padded_vocab/tp, h] slice of the output matrix (tied or not)."""
        if hasattr(self, "output_layer"):
            return self.output_layer.weight
        return self.embedding.word_embeddings.weight

    def _logits(self, x: Tensor) -> Tensor:
        """[s, b, h] (SP: [s/tp, b, h]) -> [s, b, Vp/tp] logits of this rank's vocab slice."""
        # all-gathers the sequence under SP (backward: reduce-scatter), else identity forward
        # and all-reduce backward.
        logits = parallel_lm_logits(x, self.output_weight(), self.ps,
                                    sequence_parallel=self.sequence_parallel)
        local = self.padded_vocab // self.ps.tp_size
        valid = self.config.vocab_size - self.ps.tp_rank * local   # real rows in this slice
        if valid < local:
            mask = torch.arange(local, device=logits.device) >= valid
            logits = logits.masked_fill(mask, torch.finfo(logits.dtype).min)
        return logits

    # ---- weights ---------------------------------------------------------------------------
    def to_empty(self, *, device, recurse: bool = True) -> "GPTModel":
        """``nn.Module.to_empty`` keeping the parameters' sharding attributes.

        Moving off the meta device makes torch create new Parameter objects, which would drop
        ``tensor_parallel_dim`` / ``partition_stride`` / ``sequence_parallel`` /
        ``shared_embedding``; they are copied over. Follow with :meth:`init_weights` or
        :meth:`load_full_state_dict`.
        """
        saved = {n: dict(vars(p)) for n, p in self.named_parameters()}
        super().to_empty(device=device, recurse=recurse)
        for n, p in self.named_parameters():
            for key, value in saved.get(n, {}).items():
                if not hasattr(p, key):
                    setattr(p, key, value)
        return self

    def init_weights(self, seed: int) -> None:
        """Megatron-style init, identical full weights for every tensor-parallel layout.

        Weight matrices ~ N(0, init_method_std); the attention output projection and the second
        MLP linear (the ones writing into the residual stream) ~ N(0, std / sqrt(2 L)); biases
        0; norm weights 1. Each full tensor is drawn from a generator seeded by (seed, name),
        then sharded, so TP=1, 2, 4, 8 see the same full model. Vocabulary matrices draw only
        their ``vocab_size`` real rows (padding rows are zero), so they agree across layouts
        whose padding differs. Also recomputes the fixed sinusoidal table, so a model built on
        the meta device and materialized with ``to_empty(device=...)`` is complete after this.
        """
        for m in self.modules():            # buffers too: a model materialized from the meta
            if isinstance(m, SinusoidalPositions):   # device with to_empty holds garbage
                m.reset()
        std = self.config.init_method_std
        out_std = std / math.sqrt(2.0 * self.config.num_layers)
        vocab = self.config.vocab_size

        def normal(sigma):
            return lambda t, g: t.normal_(0.0, sigma, generator=g)

        def vocab_normal(t, g):
            t.zero_()
            t[:vocab].normal_(0.0, std, generator=g)

        for name, p in self.named_parameters():
            shared = getattr(p, "shared_embedding", False)
            if name.endswith("bias"):
                fn = lambda t, g: t.zero_()  # noqa: E731
            elif "norm" in name:
                fn = lambda t, g: t.fill_(1.0)  # noqa: E731
            elif name in (_WORD_EMBEDDINGS, "output_layer.weight"):
                fn = vocab_normal
            elif name.endswith(("linear_proj.weight", "linear_fc2.weight")):
                fn = normal(out_std)
            else:
                fn = normal(std)
            init_parameter_(p, fn, seed, _WORD_EMBEDDINGS if shared else name, self.ps)

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, Tensor]:
        """Every parameter gathered to its full shape (a collective over the tp group: all tp
        ranks must call it); full tensors on every tp rank, CPU copies."""
        return {n: gather_full_tensor(p.detach(), p, self.ps).cpu()
                for n, p in self.named_parameters()}

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, Tensor]) -> None:
        """Copy this rank's shard of each full tensor in ``state`` into the parameters.

        Raises MegaliteError naming missing/unexpected names or a wrong full shape. Vocabulary
        matrices may come with any padding (e.g. from Hugging Face: none): the ``vocab_size`` real
        rows are copied and the padding rows set to zero.
        """
        params = dict(self.named_parameters())
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        if missing or unexpected:
            raise MegaliteError(f"state dict does not match the model: missing {missing[:5]}, "
                                f"unexpected {unexpected[:5]}")
        tp = self.ps.tp_size
        for name, p in params.items():
            full = state[name]
            dim = getattr(p, "tensor_parallel_dim", None)
            stride = getattr(p, "partition_stride", 1)
            shape = list(p.shape)
            if dim is not None:
                shape[dim] *= tp
            if name in (_WORD_EMBEDDINGS, "output_layer.weight") and full.shape[0] != shape[0]:
                if full.shape[0] < self.config.vocab_size or full.shape[1:] != p.shape[1:]:
                    raise MegaliteError(f"{name}: full shape {tuple(full.shape)} does not fit "
                                        f"vocab_size={self.config.vocab_size}, h={shape[1]}")
                resized = full.new_zeros(shape)
                resized[:self.config.vocab_size] = full[:self.config.vocab_size]
                full = resized
            if list(full.shape) != shape:
                raise MegaliteError(f"{name}: full shape {tuple(full.shape)}, model expects "
                                    f"{tuple(shape)}")
            p.copy_(shard_tensor(full, dim, stride, self.ps.tp_rank, tp))
