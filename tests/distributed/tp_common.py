"""Shared by the tensor-parallel model tests (test_model_tp.py, test_t5_tp.py): what one rank
reports after a forward and backward, gathered to full tensors, and the relative comparison
those tests make (tolerance and why: their module docstrings)."""
from __future__ import annotations

import torch

from megalite.parallel.grad_sync import allreduce_sequence_parallel_grads
from megalite.parallel.sharding import gather_full_tensor


def gathered_results(model, logits, loss, ps) -> dict:
    """After ``backward``: this rank's logits [b, s, Vp/tp] all-gathered over the vocabulary,
    the loss, every gradient and weight as full tensors (the partial gradients of replicated
    parameters, marked ``sequence_parallel``, summed over tp first, as the optimizers do: the
    norms under SP, the query/key norms of ``qk_layernorm`` always). Collective over the tp
    group."""
    allreduce_sequence_parallel_grads(model.parameters(), ps)
    full_logits = logits.detach()
    if ps.tp_size > 1:
        parts = [torch.empty_like(full_logits) for _ in range(ps.tp_size)]
        torch.distributed.all_gather(parts, full_logits.contiguous(), group=ps.tp_group)
        full_logits = torch.cat(parts, dim=-1)
    grads = {n: gather_full_tensor(p.grad, p, ps) for n, p in model.named_parameters()}
    return {"logits": full_logits, "loss": loss.detach(), "grads": grads,
            "weights": model.full_state_dict()}


def assert_rel_close(got, ref, what: str, rel: float) -> None:
    """max|got - ref| <= rel * max|ref| (one scale per tensor)."""
    scale = ref.abs().max().item()
    err = (got - ref).abs().max().item()
    assert err <= rel * scale, f"{what}: max abs err {err:.3e} > {rel} * {scale:.3e}"


def assert_matches_reference(got: dict, ref: dict, vocab_size: int, what, rel: float,
                             real=None) -> None:
    """One rank-0 result of :func:`gathered_results` against the single-process one: logits
    and loss within ``rel`` (only the positions ``real`` [b, s] selects, when given), padding
    logits masked, weights bitwise (layout-independent init, through the real all-gather),
    gradients within ``rel``, every reference gradient nonzero, padding rows without one."""
    v = vocab_size
    logits, ref_logits = got["logits"][..., :v], ref["logits"][..., :v]
    loss, ref_loss = got["loss"], ref["loss"]
    if real is not None:
        logits, ref_logits, loss, ref_loss = (t[real] for t in (logits, ref_logits, loss,
                                                                 ref_loss))
    assert_rel_close(logits, ref_logits, f"{what} logits", rel)
    assert torch.all(got["logits"][..., v:] == torch.finfo(torch.float32).min)
    assert_rel_close(loss, ref_loss, f"{what} loss", rel)
    for name, w_ref in ref["weights"].items():
        w = got["weights"][name]
        if name.endswith(("word_embeddings.weight", "output_layer.weight")):
            assert torch.all(w[v:] == 0), name
            w, w_ref = w[:v], w_ref[:v]
        assert torch.equal(w, w_ref), f"{what} init differs for {name}"
    assert set(got["grads"]) == set(ref["grads"])
    for name, g_ref in ref["grads"].items():
        g = got["grads"][name]
        if name.endswith(("word_embeddings.weight", "output_layer.weight")):
            assert torch.all(g[v:] == 0), f"{what} {name}: padding rows got gradient"
            g, g_ref = g[:v], g_ref[:v]
        assert g.shape == g_ref.shape, f"{what} {name}"
        assert g_ref.abs().max() > 0, f"{what} {name}: zero reference gradient"
        assert_rel_close(g, g_ref, f"{what} grad {name}", rel)
