"""The BERT model family: a bidirectional encoder with a masked-LM head and an optional binary
(sentence-order / next-sentence) head, any tensor-parallel layout, both norm placements.

    x_0     = E[ids] + P + T[types]      (post-norm: Norm(...)), then dropout
    x_L     = the transformer layers (bidirectional self-attention; padding keys masked)
    h       = Norm(x_L) (pre-norm) or x_L (post-norm)
    lm      = Norm_lm(gelu(h W_d^T + b_d)) E^T + b_out           [b, s, V]: masked-LM logits
    binary  = tanh(h[0] W_p^T + b_p) W_bin^T + b_bin             [b, 2]: on the first token

``norm_placement`` "post" is the original BERT (Hugging Face ``BertForPreTraining``), "pre"
Megatron-LM's (``MegatronBertForPreTraining``). The output matrix is the word embedding (tied,
as in both) unless ``untie_embeddings_and_output_weights``; the masked-LM bias ``b_out`` is
split over tensor-parallel ranks with the vocabulary. Attention masks: ``padding_mask`` [b, s]
(1: token, 0: padding) hides the padding keys from every query (as Hugging Face does; Megatron
also blanks the padding queries, whose outputs never reach a real token or the loss); without
padding the attention takes SDPA's unmasked path.

Parallel layout as for GPT (:mod:`megalite.model.gpt`; shared parts in
:mod:`megalite.model.transformer`). The masked-LM head's dense and norm are replicated and, under
sequence parallelism, act on each rank's sequence slice (gradients summed over tp, like the
other norms); the pooler and the binary head act on the whole first token on every rank
(under sequence parallelism the sequence is all-gathered first, its gradient split back).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megalite.model.config import TransformerConfig
from megalite.model.norms import build_norm, mark_replicated
from megalite.model.transformer import Embedding, TransformerModelBase
from megalite.parallel.comm import gather_from_tp_region
from megalite.parallel.context import ModelContext
from megalite.parallel.layers import ColumnParallelLinear
from megalite.parallel.sharding import set_sharding

__all__ = ["BertModel"]


def _linear(n_in: int, n_out: int, ctx: ModelContext, sequence_parallel: bool) -> nn.Linear:
    """A replicated ``nn.Linear`` [n_out, n_in] (gradients summed over tp when it acts on
    sequence-parallel slices)."""
    layer = nn.Linear(n_in, n_out, device=ctx.device, dtype=ctx.dtype)
    mark_replicated(layer, sequence_parallel)
    return layer


class LMHead(nn.Module):
    """The masked-LM transform ``norm(gelu(dense(h)))`` ([..., h] -> [..., h]) and the output
    bias [padded_vocab/tp] (this rank's vocabulary slice) added to the logits."""

    def __init__(self, config: TransformerConfig, ctx: ModelContext, padded_vocab: int):
        super().__init__()
        sp = config.sequence_parallel and ctx.ps.tp_size > 1
        self.approximate = "tanh" if config.activation == "gelu_tanh" else "none"
        self.dense = _linear(config.hidden_size, config.hidden_size, ctx, sp)
        self.norm = build_norm(config, ctx)
        self.output_bias = set_sharding(nn.Parameter(torch.empty(
            padded_vocab // ctx.ps.tp_size, device=ctx.device, dtype=ctx.dtype)), 0)

    def forward(self, h: Tensor) -> Tensor:
        return self.norm(F.gelu(self.dense(h), approximate=self.approximate))


class BertModel(TransformerModelBase):
    """BERT model (or the slice of it one pipeline stage holds), tensor/sequence parallel.

    Args: as :class:`~megalite.model.transformer.TransformerModelBase`; ``post_process``: hold
    the final norm (pre-norm), the masked-LM head, the output layer when untied or on a later
    stage than the embedding (a copy of the tied embedding, kept equal by the pipeline's
    embedding-group all-reduce, as in GPT), and the pooler and binary head
    (``bert_binary_head``).
    """

    def __init__(self, config: TransformerConfig, ctx: ModelContext, *, pre_process: bool = True,
                 post_process: bool = True, layer_range: tuple[int, int] | None = None):
        super().__init__(config, ctx, pre_process=pre_process, post_process=post_process,
                         layer_range=layer_range, causal=False)
        meta = ctx.on_meta()
        post_norm = config.norm_placement == "post"
        h = config.hidden_size
        if pre_process:
            self.embedding = Embedding(config, meta, num_tokentypes=config.tokentypes,
                                       norm=post_norm)
        if post_process:
            if not post_norm:
                self.final_norm = build_norm(config, meta)
            self.lm_head = LMHead(config, meta, self.padded_vocab)
            if not config.tied_embeddings or not pre_process:
                self.output_layer = ColumnParallelLinear(
                    h, self.padded_vocab, meta, bias=False, gather_output=False,
                    sequence_parallel=self.sequence_parallel)
                self.output_layer.weight.shared_embedding = config.tied_embeddings
            if config.bert_binary_head:
                # computed on the whole first token by every rank: not a partial gradient
                self.pooler = _linear(h, h, meta, sequence_parallel=False)
                self.binary_head = _linear(h, 2, meta, sequence_parallel=False)
        self._materialize(ctx)

    def forward(self, inputs: Tensor, padding_mask: Tensor | None = None,
                tokentype_ids: Tensor | None = None, labels: Tensor | None = None
                ) -> Tensor | tuple[Tensor, Tensor | None]:
        """Run this model (slice).

        inputs: token ids [b, s] when ``pre_process``; else the previous stage's hidden states
            [s, b, h] ([s/tp, b, h] with sequence parallelism).
        padding_mask: [b, s], 1 for a token and 0 for padding (None: no padding).
        tokentype_ids: [b, s] token types (segment A 0, B 1; None: 0), read by the first stage
            when the model has a token-type embedding.
        labels: masked-LM targets [b, s] (ids below vocab_size where predicted; any other
            value, e.g. -1, where not) or None.

        Returns, when ``post_process``: ``(lm, binary)``, ``lm`` the masked-LM logits of this
        rank's vocabulary slice [b, s, padded_vocab/tp] (padding columns masked) if ``labels``
        is None, else the per-token cross-entropy [b, s] (fp32, identical on all tp ranks);
        ``binary`` the binary-head logits [b, 2] (identical on all tp ranks) or None without
        the head. Without ``post_process``: hidden states [s, b, h] ([s/tp, b, h] with SP).
        """
        s = self._seq_of(inputs, "BertModel")
        self._check_seq(s)
        mask = None
        if padding_mask is not None and not bool(padding_mask.all()):
            mask = padding_mask.bool()[:, None, None, :]           # [b, 1, 1, s] keys
        x = self.embedding(inputs, 0, tokentype_ids) if self.pre_process else inputs
        x = self._run_layers(x, s, attention_mask=mask)
        if not self.post_process:
            return x
        if hasattr(self, "final_norm"):
            x = self.final_norm(x)
        lm = self._lm_output(self._logits(self.lm_head(x), self.lm_head.output_bias), labels)
        binary = None
        if self.config.bert_binary_head:
            first = gather_from_tp_region(x, self.ps, dim=0) if self.sequence_parallel else x
            binary = self.binary_head(F.tanh(self.pooler(first[0])))       # [b, 2]
        return lm, binary

    def forward_microbatch(self, hidden: Tensor | None, microbatch: dict):
        """The pipeline schedule's call (:mod:`megalite.families`) on a BERT microbatch
        (:class:`megalite.data.bert_dataset.BERTDataset` fields): ``text`` on the first stage
        (``hidden`` None), ``padding_mask`` everywhere, ``types`` on the first and ``labels``
        on the last stage."""
        inputs = microbatch["text"] if hidden is None else hidden
        return self(inputs, microbatch["padding_mask"], microbatch["types"],
                    labels=microbatch["labels"] if self.post_process else None)
