"""Packed documents: the per-token fields that describe them (Megatron-LM's
``--reset-position-ids``, ``--reset-attention-mask``, ``--eod-mask-loss``) and attention that
stays inside each document.

Representation. A GPT sample is ``s + 1`` tokens cut across document boundaries; the documents
of a microbatch travel with it as per-token int64 tensors ``[b, s]`` (no ``[b, s, s]`` mask), so
they split along the sequence exactly like the tokens (sequence or context parallelism just
slices them):

* ``doc_ids``: the index of the token's document within its sample, 0, 1, ... = the number of
  end-of-document (eod) tokens before it. The eod token belongs to the document it ends; the
  token after it starts the next one (Megatron-LM's ``get_ltor_masks_and_position_ids``).
* ``seq_pos``: the token's index in its sample, 0 .. s-1 (attention's causal order). Not a
  microbatch field: it is ``arange(s)`` until the sequence is split (context parallelism
  gives each rank the indices of its chunks).
* ``position_ids``: the position the model embeds (learned, sinusoidal or rotary): with
  ``--reset-position-ids`` it restarts at 0 at each document's first token; the eod token
  keeps the position after its document's last token.
* ``loss_mask``: with ``--eod-mask-loss``, 0 where the *input* token is the eod (the prediction
  of its successor, the next document's first token, does not count), 1 elsewhere.

Visibility (``--reset-attention-mask``): query i sees key j iff ``doc[j] == doc[i]`` and
``seq_pos[j] <= seq_pos[i]``. :func:`document_attention` computes attention under that rule for
any block of queries against any block of keys (a ring step of context parallelism), optionally
with the log-sum-exp of each query row for an online-softmax merge of several key blocks.

Kernel (measured on CPU, ``benchmarks/doc_attention_bench.py`` and BENCHMARKS.md): each
document is a contiguous run of queries and keys, so the attention is computed per (sample,
document) with torch's ``scaled_dot_product_attention`` over that document's slices (the causal
fast path on aligned runs, no mask at all where every key precedes every query); key runs of
other documents, and keys after every query, are never touched (their work is skipped, not
masked). A dense ``[b, s, s]`` bool mask and FlexAttention (whose CPU path needs
``torch.compile``) were measured against it. Rows that see no key (possible only for a key block
of another rank) give 0 and a log-sum-exp of -inf. With plain causal attention (flags off) the
model never comes here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["document_fields", "document_runs", "document_attention", "DocumentMask"]


def document_fields(tokens: Tensor, eod: int, *, reset_position_ids: bool = False,
                    reset_attention_mask: bool = False,
                    eod_mask_loss: bool = False) -> dict[str, Tensor]:
    """The document fields of input tokens [b, s] (int64) whose end-of-document id is ``eod``:
    ``{"doc_ids": [b, s]}`` with ``reset_attention_mask``, ``{"position_ids": [b, s]}`` with
    ``reset_position_ids``, ``{"loss_mask": [b, s]}`` with ``eod_mask_loss`` (all int64;
    meanings in the module doc, equal to Megatron-LM's)."""
    out: dict[str, Tensor] = {}
    is_eod = tokens == eod
    if reset_attention_mask:
        out["doc_ids"] = torch.cumsum(is_eod, dim=1) - is_eod.long()   # eods strictly before
    if reset_position_ids:
        b, s = tokens.shape
        idx = torch.arange(s, device=tokens.device).expand(b, s)
        starts = torch.zeros_like(is_eod)
        starts[:, 1:] = is_eod[:, :-1]                  # a document starts after each eod
        first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
        out["position_ids"] = idx - first
    if eod_mask_loss:
        out["loss_mask"] = (~is_eod).long()
    return out


Runs = list[list[tuple[int, int, int, int]]]
"""Per sample: (document, seq_pos of the first token, start index, length) of each run."""


def document_runs(doc_ids: Tensor, seq_pos: Tensor) -> Runs:
    """The maximal runs of tokens of one document at consecutive ``seq_pos`` in each row of
    ``doc_ids`` / ``seq_pos`` [b, n] (one host transfer of the run starts)."""
    b, n = doc_ids.shape
    brk = torch.ones(b, n, dtype=torch.bool, device=doc_ids.device)
    brk[:, 1:] = (doc_ids[:, 1:] != doc_ids[:, :-1]) | (seq_pos[:, 1:] != seq_pos[:, :-1] + 1)
    rows, cols = brk.nonzero(as_tuple=True)
    table = torch.stack([rows, cols, doc_ids[rows, cols], seq_pos[rows, cols]]).tolist()
    runs: Runs = [[] for _ in range(b)]
    for r, c, d, p in zip(*table):
        runs[r].append([d, p, c, 0])
    for row in runs:
        for j, run in enumerate(row):
            run[3] = (row[j + 1][2] if j + 1 < len(row) else n) - run[2]
    return [[tuple(run) for run in row] for row in runs]


def _masked_math(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float,
                 dropout_p: float) -> tuple[Tensor, Tensor]:
    """softmax(scale q k^T, keys where ``mask`` [n, m] is True) v and its log-sum-exp, in
    float32 math. q [1, a, n, d], k and v [1, a, m, d] -> ([1, a, n, d], [1, a, n] fp32);
    rows that see no key give 0 and -inf, with zero gradients (no NaN)."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale      # [1, a, n, m]
    seen = None
    if mask is not None:
        seen = mask.any(dim=-1)                                                  # [n]
        scores = scores.masked_fill(~mask, float("-inf"))
        scores = scores.masked_fill(~seen[:, None], 0.0)     # finite, dropped below
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None])
    if seen is not None:
        probs = probs * seen[:, None]
        lse = lse.masked_fill(~seen, float("-inf"))
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p, training=True)
    return torch.matmul(probs.to(v.dtype), v), lse


def _attend_runs(q: Tensor, k: Tensor, v: Tensor, q_runs: Runs, k_runs: Runs,
                 scale: float | None, dropout_p: float,
                 return_lse: bool) -> tuple[Tensor, Tensor | None]:
    b, a, sq, d = q.shape
    groups = k.shape[1]
    rep = a // groups
    scale = d ** -0.5 if scale is None else scale
    outs, lses = [], []
    for bi in range(b):
        by_doc: dict[int, list[tuple[int, int, int]]] = {}
        for doc, p0, c0, m in k_runs[bi]:
            by_doc.setdefault(doc, []).append((p0, c0, m))
        row_out, row_lse = [], []
        for doc, p0, r0, n in q_runs[bi]:
            # keys of this document at or before the last query; the others are skipped
            blocks = [blk for blk in by_doc.get(doc, ()) if blk[0] <= p0 + n - 1]
            qs = q[bi:bi + 1, :, r0:r0 + n]
            if not blocks:
                row_out.append(q.new_zeros(1, a, n, d))
                row_lse.append(q.new_full((1, a, n), float("-inf"), dtype=torch.float32))
                continue
            ks = torch.cat([k[bi:bi + 1, :, c0:c0 + m] for _, c0, m in blocks], dim=2)
            vs = torch.cat([v[bi:bi + 1, :, c0:c0 + m] for _, c0, m in blocks], dim=2)
            full = all(kp + m - 1 <= p0 for kp, _, m in blocks)
            aligned = len(blocks) == 1 and blocks[0][0] == p0 and blocks[0][2] == n
            if not return_lse and (full or aligned):
                row_out.append(F.scaled_dot_product_attention(
                    qs, ks, vs, dropout_p=dropout_p, is_causal=not full, scale=scale,
                    enable_gqa=rep > 1))
                continue
            mask = None
            if not full:
                kpos = torch.cat([torch.arange(kp, kp + m, device=q.device)
                                  for kp, _, m in blocks])
                qpos = torch.arange(p0, p0 + n, device=q.device)
                mask = kpos[None, :] <= qpos[:, None]                          # [n, m]
            if rep > 1:
                ks, vs = ks.repeat_interleave(rep, dim=1), vs.repeat_interleave(rep, dim=1)
            o, lse = _masked_math(qs, ks, vs, mask, scale, dropout_p)
            row_out.append(o.to(q.dtype))
            row_lse.append(lse)
        outs.append(torch.cat(row_out, dim=2) if len(row_out) > 1 else row_out[0])
        if return_lse:
            lses.append(torch.cat(row_lse, dim=2) if len(row_lse) > 1 else row_lse[0])
    out = torch.cat(outs, dim=0) if b > 1 else outs[0]
    if not return_lse:
        return out, None
    return out, (torch.cat(lses, dim=0) if b > 1 else lses[0])


def document_attention(q: Tensor, k: Tensor, v: Tensor, q_doc_ids: Tensor, k_doc_ids: Tensor,
                       q_pos: Tensor, k_pos: Tensor, scale: float | None = None, *,
                       dropout_p: float = 0.0, return_lse: bool = False):
    """Attention of a block of queries over a block of keys under the document rule: query i
    sees key j iff ``k_doc_ids[j] == q_doc_ids[i]`` and ``k_pos[j] <= q_pos[i]``.

    Shapes: q [b, a, sq, d]; k, v [b, g, sk, d] with g dividing a (query head j reads key/value
    group j // (a/g), grouped-query attention); ``q_doc_ids``, ``q_pos`` [b, sq] and
    ``k_doc_ids``, ``k_pos`` [b, sk] int64 (``*_pos``: the tokens' indices in their sample,
    any block of them, e.g. two load-balanced chunks). ``scale``: of the scores (None:
    1/sqrt(d)). ``dropout_p``: on the probabilities (draw inside the caller's RNG fork).

    Returns out [b, a, sq, d] in q's dtype (rows that see no key: 0), and with
    ``return_lse`` also (out, lse) with lse [b, a, sq] float32, the log-sum-exp of each row's
    scaled scores over its visible keys (-inf where none), differentiable, so blocks merge by
    ``out = sum_i exp(lse_i - logsumexp_i lse_i) out_i``.
    """
    q_runs = document_runs(q_doc_ids, q_pos)
    same = q_doc_ids is k_doc_ids and q_pos is k_pos
    k_runs = q_runs if same else document_runs(k_doc_ids, k_pos)
    out, lse = _attend_runs(q, k, v, q_runs, k_runs, scale, dropout_p, return_lse)
    return (out, lse) if return_lse else out


@dataclass
class DocumentMask:
    """The documents of one microbatch for self-attention over its whole sequence, passed as
    the ``attention_mask`` of :class:`megalite.model.attention.Attention`: ``doc_ids`` [b, s]
    (module doc); the tokens sit at ``seq_pos`` 0 .. s-1. The runs are found once per
    microbatch and reused by every layer."""

    doc_ids: Tensor
    runs: Runs = field(init=False, repr=False)

    def __post_init__(self) -> None:
        b, s = self.doc_ids.shape
        pos = torch.arange(s, device=self.doc_ids.device).expand(b, s)
        self.runs = document_runs(self.doc_ids, pos)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, scale: float | None,
               dropout_p: float = 0.0) -> Tensor:
        """q [b, a, s, d], k and v [b, g, s, d] -> [b, a, s, d] (:func:`document_attention`
        with this microbatch's documents for queries and keys)."""
        return _attend_runs(q, k, v, self.runs, self.runs, scale, dropout_p, False)[0]
