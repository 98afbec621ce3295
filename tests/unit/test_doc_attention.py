"""Document fields and document attention (megalite.model.doc_attention).

References: megatron-core's own ``_get_ltor_masks_and_position_ids`` (the fields must mean what
Megatron-LM's flags mean), and attention written out densely in float64 (a ``[s, s]`` mask from
the rule "same document, key not after the query"). Tolerance 1e-5 absolute/relative for
float32 attention against the float64 reference: both are softmax-weighted sums of O(1) values
over at most 64 keys, whose float32 rounding stays around 1e-7; 1e-5 leaves room and still fails
on any masking error (a wrong key changes an output by ~1e-1).
"""
from __future__ import annotations

import pytest
import torch

from megalite.model.doc_attention import (DocumentMask, document_attention, document_fields,
                                          document_runs)

EOD = 7


def packed_tokens(b=3, s=48, seed=0):
    """Random tokens in [10, 50) with eods sprinkled in: at 0, at s-1, twice in a row, none."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(10, 50, (b, s), generator=g)
    tokens[0, [0, 5, 6, 20, s - 1]] = EOD
    tokens[1, [13, 30]] = EOD
    return tokens                                        # row 2: one document


def test_fields_equal_megatron_core():
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    tokens = packed_tokens()
    s = tokens.shape[1]
    fields = document_fields(tokens, EOD, reset_position_ids=True, reset_attention_mask=True,
                             eod_mask_loss=True)
    for row in range(tokens.shape[0]):
        mask, loss_mask, pos = _get_ltor_masks_and_position_ids(tokens[row], EOD, True, True,
                                                                True, True)
        doc = fields["doc_ids"][row]
        j = torch.arange(s)
        sees = (doc[:, None] == doc[None, :]) & (j[None, :] <= j[:, None])
        assert torch.equal(sees, ~mask[0])               # megatron: True = masked out
        assert torch.equal(fields["position_ids"][row], pos)
        assert torch.equal(fields["loss_mask"][row].float(), loss_mask)
    assert set(document_fields(tokens, EOD)) == set()
    only = document_fields(tokens, EOD, reset_position_ids=True)
    assert set(only) == {"position_ids"}


def dense_reference(q, k, v, q_doc, k_doc, q_pos, k_pos, scale):
    """float64 attention with the rule as a dense mask -> (out [b, a, sq, d], lse [b, a, sq])."""
    rep = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(rep, dim=1) for t in (k, v))
    sees = (q_doc[:, :, None] == k_doc[:, None, :]) & (k_pos[:, None, :] <= q_pos[:, :, None])
    scores = torch.matmul(q.double(), k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~sees[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.nan_to_num(torch.exp(scores - lse[..., None]))
    return torch.matmul(probs, v), lse


def qkv(b, s, a=4, g=2, d=8, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, s, d, generator=gen) for n in (a, g, g)]


@pytest.mark.parametrize("groups", [4, 2, 1])
def test_whole_sequence_equals_dense_reference(groups):
    tokens = packed_tokens()
    b, s = tokens.shape
    doc = document_fields(tokens, EOD, reset_attention_mask=True)["doc_ids"]
    pos = torch.arange(s).expand(b, s)
    q, k, v = qkv(b, s, g=groups)
    ref, ref_lse = dense_reference(q, k, v, doc, doc, pos, pos, 0.3)
    out = document_attention(q, k, v, doc, doc, pos, pos, 0.3)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    out2, lse = document_attention(q, k, v, doc, doc, pos, pos, 0.3, return_lse=True)
    torch.testing.assert_close(out2.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    assert torch.equal(DocumentMask(doc).attend(q, k, v, 0.3), out)


def load_balanced(t, cp, i):
    """Chunks i and 2cp-1-i of the last dimension (context parallelism's split)."""
    chunks = t.chunk(2 * cp, dim=-1)
    return torch.cat([chunks[i], chunks[2 * cp - 1 - i]], dim=-1)


def test_block_pairs_merge_to_the_whole_attention_forward_and_backward():
    """Every (query block, key block) pair of a load-balanced CP=2 split, merged by the
    returned log-sum-exp, equals the whole attention, values and gradients."""
    tokens = packed_tokens()
    b, s = tokens.shape
    doc = document_fields(tokens, EOD, reset_attention_mask=True)["doc_ids"]
    pos = torch.arange(s).expand(b, s)
    q, k, v = (t.requires_grad_() for t in qkv(b, s))
    whole = document_attention(q, k, v, doc, doc, pos, pos, 0.5)
    grad = torch.randn(whole.shape, generator=torch.Generator().manual_seed(2))
    ref_grads = torch.autograd.grad(whole, (q, k, v), grad)

    cp = 2
    blk = lambda t, i: load_balanced(t.transpose(-1, -2), cp, i).transpose(-1, -2)   # noqa: E731
    merged, owners = [], []
    for i in range(cp):
        outs, lses = [], []
        for j in range(cp):
            o, lse = document_attention(
                blk(q, i), blk(k, j), blk(v, j), load_balanced(doc, cp, i),
                load_balanced(doc, cp, j), load_balanced(pos, cp, i), load_balanced(pos, cp, j),
                0.5, return_lse=True)
            outs.append(o)
            lses.append(lse)
        total = torch.logsumexp(torch.stack(lses), dim=0)
        weights = [torch.nan_to_num(torch.exp(lse - total))[..., None] for lse in lses]
        merged.append(sum(w * o for w, o in zip(weights, outs)))
        owners.append(load_balanced(pos, cp, i)[0])
    # the whole output in the load-balanced order
    order = torch.cat(owners)
    torch.testing.assert_close(torch.cat(merged, dim=2), whole[:, :, order],
                               rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(torch.cat(merged, dim=2), (q, k, v), grad[:, :, order])
    for got, want in zip(grads, ref_grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_rows_that_see_no_key_give_zero_and_minus_inf():
    q, k, v = qkv(1, 4, a=2, g=2)
    q_doc = torch.tensor([[0, 0, 1, 1]])
    k_doc = torch.tensor([[0, 0, 0, 0]])
    q_pos = torch.tensor([[0, 1, 2, 3]])
    k_pos = torch.tensor([[1, 2, 3, 4]])       # keys after query 0; document 1 has no keys
    q.requires_grad_()
    out, lse = document_attention(q, k, v, q_doc, k_doc, q_pos, k_pos, return_lse=True)
    assert torch.equal(out[0, :, [0, 2, 3]], torch.zeros(2, 3, 8))
    assert torch.all(lse[0, :, [0, 2, 3]] == float("-inf"))
    ref, _ = dense_reference(q, k, v, q_doc, k_doc, q_pos, k_pos, 8 ** -0.5)
    torch.testing.assert_close(out.double(), ref)
    (grad,) = torch.autograd.grad((out.sum() + lse[torch.isfinite(lse)].sum()), q)
    assert torch.isfinite(grad).all()


def test_runs_split_at_documents_and_position_gaps():
    doc = torch.tensor([[0, 0, 1, 1, 1, 1]])
    pos = torch.tensor([[0, 1, 2, 3, 10, 11]])       # two chunks: the gap starts a new run
    assert document_runs(doc, pos) == [[(0, 0, 0, 2), (1, 2, 2, 2), (1, 10, 4, 2)]]
