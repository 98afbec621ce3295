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

The embedding, the layer and what every model chunk does around them are shared with the other
families (:mod:`megalite.model.transformer`).
"""
from __future__ import annotations

from torch import Tensor

from megalite.errors import MegaliteError
from megalite.inference.kv_cache import cache_offset
from megalite.model.config import TransformerConfig, padded_vocab_size
from megalite.model.doc_attention import DocumentMask
from megalite.model.norms import build_norm
from megalite.parallel.context_parallel import RingDocuments
from megalite.model.transformer import Embedding, TransformerModelBase
from megalite.parallel.context import ModelContext
from megalite.parallel.layers import ColumnParallelLinear

__all__ = ["GPTModel", "padded_vocab_size"]


class GPTModel(TransformerModelBase):
    """GPT model (or the slice of it one pipeline stage holds), tensor/sequence parallel.

    Args: as :class:`~megalite.model.transformer.TransformerModelBase` (``post_process``: hold
    the final norm and the output layer). Parameters are created in ``ctx.dtype`` (default
    torch's default, float32; init is drawn in float32 and cast, so a bf16 model holds the
    rounded float32 weights).
    """

    def __init__(self, config: TransformerConfig, ctx: ModelContext, *, pre_process: bool = True,
                 post_process: bool = True, layer_range: tuple[int, int] | None = None):
        super().__init__(config, ctx, pre_process=pre_process, post_process=post_process,
                         layer_range=layer_range, causal=True)
        meta = ctx.on_meta()
        if pre_process:
            self.embedding = Embedding(config, meta)
        self._add_layers(ctx)
        if post_process:
            self.final_norm = build_norm(config, meta)
            if not config.tied_embeddings or not pre_process:
                # Untied output layer, or the last stage's copy of a tied embedding (kept equal
                # to the first stage's by the pipeline's embedding-group all-reduce).
                self.output_layer = ColumnParallelLinear(
                    config.hidden_size, self.padded_vocab, meta, bias=False,
                    gather_output=False, sequence_parallel=self.sequence_parallel)
                self.output_layer.weight.shared_embedding = config.tied_embeddings
        self._materialize(ctx)

    # ---- forward ---------------------------------------------------------------------------
    def forward(self, inputs: Tensor, labels: Tensor | None = None, *, kv_cache=None,
                position_ids: Tensor | None = None, doc_ids: Tensor | None = None) -> Tensor:
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
            Not with sequence parallelism or context parallelism.
        position_ids, doc_ids: packed documents (training; [b, s] int64, the microbatch fields
            of :mod:`megalite.model.doc_attention`): per-token positions
            (``--reset-position-ids``), attention inside each document
            (``--reset-attention-mask``). None: positions 0.. and causal attention.

        Context parallelism (``ps.cp_size > 1``): ``inputs``, ``labels`` and the document
        fields are this rank's two chunks of each sequence ([b, s/cp],
        :mod:`megalite.parallel.context_parallel`), and so are the returned logits / per-token
        loss; positions default to the chunks' global ones.
        """
        if kv_cache is not None and (position_ids is not None or doc_ids is not None):
            raise MegaliteError("packed-document fields (position_ids, doc_ids) are for "
                                "training; generation with a KV cache takes one document a row")
        if self.ps.cp_size > 1 and kv_cache is not None:
            raise MegaliteError("generation with --context-parallel-size > 1 is not supported "
                                "(the KV cache holds whole sequences): generate with CP 1")
        offset = cache_offset(kv_cache, self.sequence_parallel)
        s = self._seq_of(inputs, "GPTModel")
        if self.ps.cp_size > 1 and position_ids is None:     # the chunks' global positions
            b = inputs.shape[0] if self.pre_process else inputs.shape[1]
            position_ids = self._cp_positions(s, inputs.device).expand(b, s)
        self._check_seq(offset + s * self.ps.cp_size)
        x = (self.embedding(inputs, offset, position_ids=position_ids) if self.pre_process
             else inputs)
        mask = None if doc_ids is None else (
            DocumentMask(doc_ids) if self.ps.cp_size == 1 else RingDocuments(doc_ids, self.ps))
        x = self._run_layers(x, s, offset, kv_cache, mask, position_ids)
        if kv_cache is not None:
            kv_cache.advance(s)
        if not self.post_process:
            return x
        return self.lm_head(x, labels)

    def lm_head(self, x: Tensor, labels: Tensor | None) -> Tensor:
        """The last stage's head: final norm, logits, then the per-token loss [b, s] (or the
        logits [b, s, Vp/tp] without ``labels``) of ``x`` [s, b, h] ([s/tp, b, h] with SP);
        one region for ``--compile`` (:mod:`megalite.training.compile`)."""
        return self._lm_output(self._logits(self.final_norm(x)), labels)

    def forward_microbatch(self, hidden: Tensor | None, microbatch: dict) -> Tensor:
        """The pipeline schedule's call (:mod:`megalite.families`): ``microbatch["tokens"]``
        on the first stage (``hidden`` None), else the previous stage's ``hidden``; with
        ``microbatch["labels"]`` on the last stage (per-token loss [b, s]); packed documents'
        ``position_ids`` and ``doc_ids`` when the microbatch has them (every stage)."""
        inputs = microbatch["tokens"] if hidden is None else hidden
        return self(inputs, labels=microbatch["labels"] if self.post_process else None,
                    position_ids=microbatch.get("position_ids"),
                    doc_ids=microbatch.get("doc_ids"))
