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
in the others only the pairs of runs of one document are computed (each causal or unmasked,
by the same flash kernel and merge as plain causal steps; :class:`RingDocuments`).

The loss with ``--eod-mask-loss``: each CP rank divides its masked sum by its share of the
microbatch's whole count (``loss_denominator``, set by :func:`local_microbatch`), so the mean
over the CP ranks is Megatron's per-microbatch ``sum(loss mask) / sum(mask)``.

Gradients: every CP rank computes the gradient of the loss of its own tokens (through the
other ranks' keys/values too); the weights are replicated over CP, so their gradients are
averaged over the CP group (each rank's loss is the mean over the same number of tokens) before
the data-parallel average (:func:`megalite.parallel.grad_sync.allreduce_context_parallel_grads`),
which gives the gradient of the mean over the whole sequence, as Megatron's reduction over the
DP x CP group does. (ZeRO-1/2 then shard over the DP ranks only: the optimizer state is
replicated over CP, where Megatron's distributed optimizer shards it over DP x CP.)

Measured in BENCHMARKS.md (``benchmarks/context_parallel_bench.py``): activations per rank
0.52 / 0.26 of CP=1 at CP=2 / 4 for a 16k-token sequence.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from megalite.distributed.parallel_state import ParallelState
from megalite.errors import MegaliteError
from megalite.model.doc_attention import document_runs

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


def _merge(out: Tensor, lse: Tensor, index: tuple, out_b: Tensor, lse_b: Tensor) -> None:
    """Online-softmax merge of a block's (out_b, lse_b) into the rows ``index`` (samples,
    heads, positions) of the running (out fp32, lse fp32), in place; rows with no key so far
    keep nothing of their 0 / -inf start."""
    old = lse[index]
    new = torch.logaddexp(old, lse_b)
    keep = torch.where(torch.isneginf(old), 0.0, torch.exp(old - new))
    out[index] = out[index] * keep[..., None] + out_b.float() * torch.exp(lse_b - new)[..., None]
    lse[index] = new


class RingDocuments:
    """The documents of one microbatch under context parallelism, for :func:`ring_attention`
    (passed as the attention's ``attention_mask``, like
    :class:`~megalite.model.doc_attention.DocumentMask` without CP).

    ``doc_ids`` [b, n]: this rank's slice (its two chunks) of the microbatch's ``doc_ids``;
    the constructor all-gathers them over ``ps.cp_group`` (collective) and plans, per ring
    step, the blocks to compute: for each run of this rank's queries of one document
    (:func:`~megalite.model.doc_attention.document_runs`), each run of the same document
    among the step's keys that is not after it. With load-balanced chunks such a pair is
    either the same run (causal) or a key run wholly before the query run (no mask), so
    every block runs the flash kernel as a plain causal ring step does; a step with no block
    is skipped."""

    def __init__(self, doc_ids: Tensor, ps: ParallelState):
        b, n = doc_ids.shape
        cp, device = ps.cp_size, doc_ids.device
        parts = [torch.empty_like(doc_ids) for _ in range(cp)]
        dist.all_gather(parts, doc_ids.contiguous(), group=ps.cp_group)
        pos = [local_indices(n * cp, cp, r, device).expand(b, n) for r in range(cp)]
        mine = document_runs(parts[ps.cp_rank], pos[ps.cp_rank])
        # by source rank: [(sample, query rows, key rows, causal)]
        self.blocks = [_blocks(mine, document_runs(parts[r], pos[r]), r == ps.cp_rank)
                       for r in range(cp)]

    @property
    def visible(self) -> list[bool]:
        """By source CP rank: whether any query of this rank sees a key it holds."""
        return [bool(blocks) for blocks in self.blocks]


def _blocks(q_runs, k_runs, own: bool) -> list[tuple[int, slice, slice, bool]]:
    """(sample, query rows, key rows, causal) of every visible pair of runs (class doc)."""
    out = []
    for bi, (qs, ks) in enumerate(zip(q_runs, k_runs)):
        for doc, p0, r0, n in qs:
            for kdoc, kp0, c0, m in ks:
                if kdoc != doc or kp0 > p0 + n - 1:
                    continue                                   # another document, or later
                causal = own and kp0 == p0
                if not causal and kp0 + m - 1 >= p0:           # cannot happen (class doc)
                    raise MegaliteError("context parallelism: a key run overlaps a query run")
                out.append((bi, slice(r0, r0 + n), slice(c0, c0 + m), causal))
    return out


def _step_blocks(step: int, q: Tensor, ps: ParallelState, docs: RingDocuments | None) -> list:
    """[(index of the query rows, index of the key rows, causal)] of ring step ``step``: the
    whole chunks (plain causal), or the visible pairs of document runs (empty: skipped)."""
    src = (ps.cp_rank - step) % ps.cp_size
    if docs is None:
        rows, keys, causal = _plan(step, ps, q.shape[2] // 2)
        plan = [(slice(None), rows, keys, causal)]
    else:
        plan = docs.blocks[src]
    blocks = []
    for bi, rows, keys, causal in plan:
        bsel = bi if isinstance(bi, slice) else slice(bi, bi + 1)
        blocks.append(((bsel, slice(None), rows), (bsel, slice(None), keys), causal))
    return blocks


def _step_forward(step: int, q: Tensor, kv: Tensor, ps: ParallelState, scale: float,
                  docs: RingDocuments | None) -> list:
    """[(index of the query rows, out_b, lse_b)] of ring step ``step`` (empty: skipped)."""
    out = []
    for qi, ki, causal in _step_blocks(step, q, ps, docs):
        o_b, l_b = _block_forward(q[qi], kv[0][ki], kv[1][ki], causal, scale)
        out.append((qi, o_b, l_b))
    return out


def _step_backward(step: int, dout: Tensor, q: Tensor, kv: Tensor, out: Tensor, lse: Tensor,
                   ps: ParallelState, scale: float, docs: RingDocuments | None) -> list:
    """[(index of the query rows, index of the key rows, dq_b, dk_b, dv_b)] of ring step
    ``step`` (empty: skipped)."""
    return [(qi, ki) + _block_backward(dout[qi], q[qi], kv[0][ki], kv[1][ki], out[qi], lse[qi],
                                       causal, scale)
            for qi, ki, causal in _step_blocks(step, q, ps, docs)]


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
            for block in _step_forward(step, q, kv, ps, scale, docs):
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
            for qi, ki, dq_b, dk_b, dv_b in _step_backward(step, dout, q, kv, out, lse, ps,
                                                           ctx.scale, ctx.docs):
                dq[qi] += dq_b.float()
                dkv[0][ki] += dk_b.float()
                dkv[1][ki] += dv_b.float()
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
