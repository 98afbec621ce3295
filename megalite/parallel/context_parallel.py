"""Context parallelism (CP): every sequence split over the ``cp`` ranks of a context-parallel
group, attention by a ring of key/value blocks.

Layout. A sequence of ``s`` tokens is cut into ``2 cp`` chunks of ``c = s / (2 cp)`` tokens;
CP rank ``i`` holds chunks ``i`` and ``2 cp - 1 - i`` (:func:`local_indices`), so under causal
attention every rank has the same work (an early chunk sees few keys, its partner many). Every
activation of the model is this rank's ``[s/cp, b, h]`` (``[s/(cp tp), b, h]`` with sequence
parallelism): embeddings, norms, MLP, the output layer and the per-token loss act on the local
tokens only; positions (learned, sinusoidal, rotary) are the tokens' global indices. The data
path slices every per-token field of a microbatch the same way (:func:`local_microbatch`).

Attention (:func:`ring_attention`). Each rank's queries must see the keys/values of earlier
tokens held by the others. The key/value block of each rank travels around the ring (rank r
sends to r+1, receives from r-1) while the current one is used: at step t rank r holds the
block of rank j = r - t (mod cp), and with the load-balanced chunks

* t = 0 (its own block): causal attention over its two chunks (in increasing position order);
* j < r: all its queries against chunk j only (every query sees it, nobody sees 2cp-1-j);
* j > r: its late chunk 2cp-1-r against both chunks of j (its early chunk sees neither),

so every step after the first costs the same ``c x 2c`` block. Each block gives its output and
the log-sum-exp of its rows; the blocks merge by the online softmax
``lse = logaddexp(lse, lse_b)``, ``out = out e^(lse_old - lse) + out_b e^(lse_b - lse)``
(fp32 log-sum-exp). Backward (an autograd Function) sends the blocks around again, each with
the gradient of its keys/values accumulating as it travels; one last shift brings every
gradient home. A block's backward is the flash-attention one with the merged output and
log-sum-exp (exact: softmax rows over all keys), so nothing of size ``s x s`` is ever kept.

Packed documents (``--reset-attention-mask``, :mod:`megalite.model.doc_attention`): the
microbatch's ``doc_ids`` are sliced like the tokens; :class:`RingDocuments` all-gathers them
over the CP group once per microbatch, so every rank knows the documents and positions of the
block it holds at each ring step. A step whose block holds no key that one of this rank's
queries may see (another document, or only later tokens) is skipped, not computed and masked;
the others run :func:`~megalite.model.doc_attention.document_attention` with its log-sum-exp,
merge the same way, and backward recomputes the block under autograd: with the merged
``out``/``lse`` and the block's weight ``w = exp(lse_b - lse)``, the block's output receives
``w dout`` and its log-sum-exp ``w (dout . out_b - dout . out)``.

The loss with ``--eod-mask-loss``: each CP rank divides its masked sum by its share of the
microbatch's whole count (``loss_denominator``, set by :func:`local_microbatch`), so the mean
over the CP ranks is Megatron's per-microbatch ``sum(loss mask) / sum(mask)``.

Gradients: every CP rank computes the gradient of the loss of its own tokens (through the
other ranks' keys/values too); the weights are replicated over CP, so their gradients are
averaged over the CP group (each rank's loss is the mean over the same number of tokens) before
the data-parallel average (:func:`megalite.parallel.grad_sync.allreduce_context_parallel_grads`),
which gives the gradient
of the mean over the whole sequence, as Megatron's reduction over the DP x CP group does.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from megalite.distributed.parallel_state import ParallelState
from megalite.errors import MegaliteError
from megalite.model.doc_attention import document_attention, document_runs

__all__ = ["local_indices", "local_microbatch", "local_collate", "ring_attention",
           "RingDocuments", "check_context_parallel"]


def local_indices(seq_length: int, cp_size: int, cp_rank: int, device=None) -> Tensor:
    """Global token indices int64 [s/cp] held by ``cp_rank``: chunks ``cp_rank`` and
    ``2 cp - 1 - cp_rank`` of ``2 cp`` equal chunks, in increasing order."""
    if seq_length % (2 * cp_size):
        raise MegaliteError(f"--seq-length {seq_length} is not divisible by 2 x "
                            f"--context-parallel-size {cp_size} = {2 * cp_size} (each rank "
                            f"holds two equal chunks of every sequence)")
    c = seq_length // (2 * cp_size)
    first = torch.arange(cp_rank * c, (cp_rank + 1) * c, device=device)
    late = 2 * cp_size - 1 - cp_rank
    return torch.cat([first, torch.arange(late * c, (late + 1) * c, device=device)])


def local_microbatch(batch: dict[str, Tensor], seq_length: int, ps: ParallelState
                     ) -> dict[str, Tensor]:
    """This CP rank's part of a microbatch: every field of shape [b, seq_length] (tokens,
    labels, per-token document fields) sliced to [b, seq_length/cp] at :func:`local_indices`;
    other fields as they are. With a ``loss_mask``, also ``loss_denominator`` [b] float32:
    the sample's count of loss tokens over the whole sequence / cp (its share; module doc).
    The identity when cp == 1."""
    if ps.cp_size == 1:
        return batch
    idx = local_indices(seq_length, ps.cp_size, ps.cp_rank)
    out = {k: (v.index_select(1, idx.to(v.device)).contiguous()
               if v.dim() == 2 and v.shape[1] == seq_length else v)
           for k, v in batch.items()}
    if "loss_mask" in batch:
        out["loss_denominator"] = batch["loss_mask"].float().sum(1) / ps.cp_size
    return out


def local_collate(collate, seq_length: int, ps: ParallelState, samples: list
                  ) -> dict[str, Tensor]:
    """``collate(samples)`` then :func:`local_microbatch` (bind the first three arguments with
    ``functools.partial`` to get a data path's collate function for this CP rank)."""
    return local_microbatch(collate(samples), seq_length, ps)


# ---- one block of attention: (out, lse) and its backward -------------------------------------
def _use_flash(q: Tensor, kernel: str | None) -> bool:
    """torch's CPU flash kernel (no [n, m] scores kept, GQA native) on CPU; elsewhere (or
    ``kernel="math"``, for tests) the explicit fp32 math below."""
    return kernel == "flash" or (kernel is None and q.device.type == "cpu")


def _block_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float,
                   kernel: str | None = None) -> tuple[Tensor, Tensor]:
    """q [b, a, n, d], k/v [b, g, m, d] -> (out [b, a, n, d] in q's dtype, lse [b, a, n]
    fp32); ``causal``: n == m, query i sees keys <= i."""
    if _use_flash(q, kernel):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, scale=scale)
        return out, lse
    kr, vr = _expand(k, q), _expand(v, q)
    scores = torch.matmul(q.float(), kr.float().transpose(-1, -2)) * scale
    if causal:
        n = q.shape[2]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device)
                                    .triu(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse[..., None]), vr.float())
    return out.to(q.dtype), lse


def _block_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                    causal: bool, scale: float, kernel: str | None = None
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of one block given the *merged* output and log-sum-exp of its
    query rows (the flash-attention backward: P = exp(scale q k^T - lse),
    dS = P (dP - rowsum(dout out)))."""
    if _use_flash(q, kernel):
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, scale=scale)
        return dq, dk, dv
    kr, vr = _expand(k, q).float(), _expand(v, q).float()
    qf, do = q.float(), dout.float()
    scores = torch.matmul(qf, kr.transpose(-1, -2)) * scale
    if causal:
        n = q.shape[2]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device)
                                    .triu(1), float("-inf"))
    p = torch.exp(scores - lse[..., None])
    dv = torch.matmul(p.transpose(-1, -2), do)
    dp = torch.matmul(do, vr.transpose(-1, -2))
    ds = p * (dp - (do * out.float()).sum(-1, keepdim=True)) * scale
    dq, dk = torch.matmul(ds, kr), torch.matmul(ds.transpose(-1, -2), qf)
    return dq.to(q.dtype), _fold(dk, k).to(k.dtype), _fold(dv, v).to(v.dtype)


def _expand(kv: Tensor, q: Tensor) -> Tensor:
    """Key/value groups [b, g, m, d] -> one per query head [b, a, m, d]."""
    rep = q.shape[1] // kv.shape[1]
    return kv if rep == 1 else kv.repeat_interleave(rep, dim=1)


def _fold(grad: Tensor, kv: Tensor) -> Tensor:
    """Per-query-head gradient [b, a, m, d] -> per group [b, g, m, d] (sum over the group)."""
    b, g, m, d = kv.shape
    return grad.view(b, g, -1, m, d).sum(2)


# ---- the ring ------------------------------------------------------------------------------
def _shift(tensor: Tensor, ps: ParallelState) -> tuple[Tensor, list]:
    """Send ``tensor`` to the next CP rank and receive the previous one's (same shape),
    asynchronously: (receive buffer, works to wait on)."""
    ranks, r, n = ps.cp_group_ranks, ps.cp_rank, ps.cp_size
    buf = torch.empty_like(tensor)
    ops = [dist.P2POp(dist.isend, tensor, ranks[(r + 1) % n], ps.cp_group),
           dist.P2POp(dist.irecv, buf, ranks[(r - 1) % n], ps.cp_group)]
    return buf, dist.batch_isend_irecv(ops)


def _wait(works: list) -> None:
    for w in works:
        w.wait()


def _plan(step: int, ps: ParallelState, c: int) -> tuple[slice, slice, bool] | None:
    """(query rows, key rows of the travelling block, causal) of ring step ``step``, or None
    when no query of this rank sees a key of that block (module doc)."""
    src = (ps.cp_rank - step) % ps.cp_size
    if step == 0:
        return slice(0, 2 * c), slice(0, 2 * c), True
    if src < ps.cp_rank:
        return slice(0, 2 * c), slice(0, c), False
    return slice(c, 2 * c), slice(0, 2 * c), False


def _merge(out: Tensor, lse: Tensor, rows: slice, out_b: Tensor, lse_b: Tensor) -> None:
    """Online-softmax merge of a block's (out_b, lse_b) into rows ``rows`` of the running
    (out fp32, lse fp32), in place; rows with no key so far and none in the block (lse -inf
    on both sides, possible with documents) stay 0 / -inf."""
    old = lse[:, :, rows]
    new = torch.logaddexp(old, lse_b)
    none = torch.isneginf(new)
    keep = torch.where(none, 0.0, torch.exp(old - new))
    take = torch.where(none, 0.0, torch.exp(lse_b - new))
    out[:, :, rows] = out[:, :, rows] * keep[..., None] + out_b.float() * take[..., None]
    lse[:, :, rows] = new


class RingDocuments:
    """The documents of one microbatch under context parallelism, for :func:`ring_attention`
    (passed as the attention's ``attention_mask``, like
    :class:`~megalite.model.doc_attention.DocumentMask` without CP).

    ``doc_ids`` [b, n]: this rank's slice (its two chunks) of the microbatch's ``doc_ids``;
    the constructor all-gathers them over ``ps.cp_group`` (collective) and finds which ring
    steps hold keys this rank's queries may see."""

    def __init__(self, doc_ids: Tensor, ps: ParallelState):
        b, n = doc_ids.shape
        cp, device = ps.cp_size, doc_ids.device
        parts = [torch.empty_like(doc_ids) for _ in range(cp)]
        dist.all_gather(parts, doc_ids.contiguous(), group=ps.cp_group)
        self.doc_ids = parts                                                # by CP rank
        self.pos = [local_indices(n * cp, cp, r, device).expand(b, n) for r in range(cp)]
        self.rank = ps.cp_rank
        mine = _spans(document_runs(self.doc_ids[ps.cp_rank], self.pos[ps.cp_rank]))
        self.visible = []    # by source rank: does any query of this rank see a key of it
        for r in range(cp):
            theirs = _spans(document_runs(self.doc_ids[r], self.pos[r]))
            self.visible.append(any(
                doc in theirs[i] and theirs[i][doc][0] <= last
                for i, row in enumerate(mine) for doc, (_, last) in row.items()))

    def keys(self, source: int) -> tuple[Tensor, Tensor]:
        """(doc_ids, seq positions) [b, n] of the tokens of CP rank ``source``."""
        return self.doc_ids[source], self.pos[source]

    def attend(self, q: Tensor, k: Tensor, v: Tensor, source: int, scale: float
               ) -> tuple[Tensor, Tensor]:
        """This rank's queries q [b, a, n, d] over the keys/values [b, g, n, d] of CP rank
        ``source`` under the document rule -> (out, lse fp32), differentiable."""
        k_doc, k_pos = self.keys(source)
        return document_attention(q, k, v, self.doc_ids[self.rank], k_doc,
                                  self.pos[self.rank], k_pos, scale, return_lse=True)


def _spans(runs) -> list[dict[int, tuple[int, int]]]:
    """Per sample: document -> (first, last) sequence position among the runs."""
    out = []
    for row in runs:
        spans: dict[int, tuple[int, int]] = {}
        for doc, p0, _, m in row:
            lo, hi = spans.get(doc, (p0, p0 + m - 1))
            spans[doc] = (min(lo, p0), max(hi, p0 + m - 1))
        out.append(spans)
    return out


def _step_forward(step: int, q: Tensor, kv: Tensor, ps: ParallelState, scale: float,
                  docs: RingDocuments | None):
    """(query rows, out_b, lse_b) of ring step ``step``, or None for a skipped step."""
    src = (ps.cp_rank - step) % ps.cp_size
    if docs is not None:
        if not docs.visible[src]:
            return None
        with torch.no_grad():
            o_b, l_b = docs.attend(q, kv[0], kv[1], src, scale)
        return slice(None), o_b, l_b
    rows, keys, causal = _plan(step, ps, q.shape[2] // 2)
    o_b, l_b = _block_forward(q[:, :, rows], kv[0][:, :, keys], kv[1][:, :, keys], causal,
                              scale)
    return rows, o_b, l_b


def _step_backward(step: int, dout: Tensor, q: Tensor, kv: Tensor, out: Tensor, lse: Tensor,
                   ps: ParallelState, scale: float, docs: RingDocuments | None):
    """(query rows, key rows, dq_b, dk_b, dv_b) of ring step ``step``, or None if skipped."""
    src = (ps.cp_rank - step) % ps.cp_size
    if docs is None:
        rows, keys, causal = _plan(step, ps, q.shape[2] // 2)
        return (rows, keys) + _block_backward(
            dout[:, :, rows], q[:, :, rows], kv[0][:, :, keys], kv[1][:, :, keys],
            out[:, :, rows], lse[:, :, rows], causal, scale)
    if not docs.visible[src]:
        return None
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_() for t in (q, kv[0], kv[1])]
        o_b, l_b = docs.attend(*inputs, src, scale)
        w = torch.where(torch.isneginf(l_b), 0.0, torch.exp(l_b - lse))
        do = dout.float()
        grad_o = (w[..., None] * do).to(o_b.dtype)
        grad_l = w * ((do * o_b.detach().float()).sum(-1) - (do * out.float()).sum(-1))
        grads = torch.autograd.grad((o_b, l_b), inputs, (grad_o, grad_l), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]
    return (slice(None), slice(None), *grads)


class _RingAttention(torch.autograd.Function):
    """softmax(scale q k^T, causal over the global positions, or the document rule) v for
    this rank's two chunks."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, ps: ParallelState, scale: float,
                docs: RingDocuments | None):
        kv = torch.stack([k, v]).contiguous()                  # travels as one tensor
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
        for step in range(ps.cp_size):
            works = []
            if step + 1 < ps.cp_size:
                nxt, works = _shift(kv, ps)                    # overlaps this step's block
            block = _step_forward(step, q, kv, ps, scale, docs)
            if block is not None:
                _merge(out, lse, *block)
            if works:
                _wait(works)
                kv = nxt
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ps, ctx.scale, ctx.docs = ps, scale, docs
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        ps = ctx.ps
        dout = dout.contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v]).contiguous()
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)
        for step in range(ps.cp_size):
            works = []
            if step + 1 < ps.cp_size:
                nxt, works = _shift(kv, ps)
            block = _step_backward(step, dout, q, kv, out, lse, ps, ctx.scale, ctx.docs)
            if block is not None:
                rows, keys, dq_b, dk_b, dv_b = block
                dq[:, :, rows] += dq_b.float()
                dkv[0][:, :, keys] += dk_b.float()
                dkv[1][:, :, keys] += dv_b.float()
            if works:
                _wait(works)
                kv = nxt
            # the gradient travels with its block: one shift per step, the last brings it home
            dkv_next, dworks = _shift(dkv, ps)
            _wait(dworks)
            dkv = dkv_next
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None


def ring_attention(q: Tensor, k: Tensor, v: Tensor, ps: ParallelState,
                   scale: float | None = None, docs: RingDocuments | None = None) -> Tensor:
    """Causal attention of this CP rank's queries over the whole sequence's keys/values.

    q [b, a, 2c, d], k and v [b, g, 2c, d] (g divides a: grouped-query attention; query head
    j reads group j // (a/g)): this rank's two chunks (:func:`local_indices`) in that order.
    ``scale``: of the scores (None: 1/sqrt(d)). ``docs``: packed documents (a query sees
    only earlier keys of its own document), None: plain causal. Returns [b, a, 2c, d] in q's
    dtype. Collective over ``ps.cp_group`` (every CP rank calls it at the same point)."""
    if q.shape[2] % 2:
        raise MegaliteError(f"ring attention needs two equal chunks per rank, got "
                            f"{q.shape[2]} tokens")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _RingAttention.apply(q, k, v, ps, scale, docs)


def check_context_parallel(config) -> None:
    """Start-up checks of a run with ``--context-parallel-size`` > 1 (``config``: its
    TrainConfig); ConfigError naming the flag. Nothing to check when cp == 1."""
    from megalite.errors import ConfigError

    par, model = config.parallel, config.model
    cp = par.context_parallel_size
    if cp == 1:
        return
    flag = "--context-parallel-size"

    def refuse(why: str) -> None:
        raise ConfigError(f"{flag} {cp}: {why}", "parallel", "context_parallel_size")

    if model.model_type != "gpt":
        refuse(f"context parallelism is implemented for GPT only (--model-type "
               f"{model.model_type}: its bidirectional/encoder-decoder attention would need "
               f"another ring); use 1")
    s = model.training_seq_length
    if s % (2 * cp):
        refuse(f"--seq-length {s} is not divisible by 2 x {cp} = {2 * cp} (each rank holds two "
               f"equal chunks of every sequence)")
    if model.attention_dropout > 0:
        refuse("attention dropout is not implemented with context parallelism (the ring's "
               "blocks are merged after the softmax); set --attention-dropout 0")
    if par.zero_stage == 3:
        refuse("--zero-stage 3 reduces gradients inside DeepSpeed's hooks, before megalite "
               "can average them over the context-parallel ranks; use --zero-stage 1 or 2")
    sp_tp = par.tensor_model_parallel_size if par.sequence_parallel else 1
    if (s // cp) % sp_tp:
        refuse(f"--sequence-parallel needs each rank's {s // cp} tokens divisible by the "
               f"tensor-parallel size {sp_tp}")
