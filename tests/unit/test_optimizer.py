"""megalite's Optimizer in one process: parameter groups, clipping vs torch, the fp16 loss scaler,
bf16 master weights / fp32 accumulation, and bitwise-exact resume from state_dict.

Tiny GPT models (presets ``tiny`` / ``tiny-llama`` with a 300-token vocabulary, 16 positions);
the file takes ~10 s on the 2-core machine.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from megalite.config import OptimConfig, PrecisionConfig
from megalite.distributed.parallel_state import ParallelState
from megalite.errors import MegaliteError
from megalite.model import get_preset
from megalite.model.gpt import GPTModel
from megalite.optim.grad_clip import clip_by_global_norm, grad_norm_tensor
from megalite.optim.loss_scaler import LossScaler, build_loss_scaler
from megalite.optim.base import param_groups
from megalite.optim.optimizer import Optimizer
from megalite.parallel.context import ModelContext

PS = ParallelState.single()
SEQ, BATCH, MICRO = 16, 4, 2


def make_model(recipe="tiny", seed=3):
    cfg = get_preset(recipe).replace(vocab_size=300, max_position_embeddings=SEQ, seq_length=SEQ)
    model = GPTModel(cfg, ModelContext(PS))
    model.init_weights(seed)
    return model


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 300, (BATCH, SEQ + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def accumulate(model, opt, seed=0):
    """Backward of BATCH // MICRO microbatches (loss mean / count, times the loss scale)."""
    tokens, labels = batch(seed)
    n = BATCH // MICRO
    losses = []
    for m in range(n):
        sl = slice(m * MICRO, (m + 1) * MICRO)
        loss = model(tokens[sl], labels[sl]).mean()
        opt.backward(loss * opt.loss_scale / n, None)
        losses.append(float(loss.detach()))
    return sum(losses) / n


def train_step(model, opt, seed=0, lr=1e-3):
    loss = accumulate(model, opt, seed)
    opt.finish_grad_sync()
    result = opt.step(lr)
    opt.zero_grad()
    return loss, result


# -- parameter groups ------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", ["tiny", "tiny-llama"])
def test_param_groups_no_decay_on_biases_and_norms(recipe):
    model = make_model(recipe)
    decay, plain = param_groups([model], weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    for name, p in zip(decay["names"], decay["params"]):
        assert p.dim() == 2 and not name.endswith("bias"), name
    for name, p in zip(plain["names"], plain["params"]):
        assert p.dim() == 1, name
    assert any("norm" in n for n in plain["names"])
    if recipe == "tiny":
        assert any(n.endswith("bias") for n in plain["names"])
    # every parameter exactly once
    assert len(decay["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_weight_decay_only_touches_matrices():
    """With zero gradients AdamW's update is pure decay: 1-D params must not move at all."""
    model = make_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = Optimizer([model], OptimConfig(weight_decay=0.5, clip_grad=0.0), PrecisionConfig(), PS)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step(0.1)
    for n, p in model.named_parameters():
        if p.dim() == 1:
            assert torch.equal(p, before[n]), n
        elif before[n].abs().max() > 0:
            assert torch.allclose(p, before[n] * (1 - 0.1 * 0.5), rtol=1e-6, atol=0), n


# -- clipping --------------------------------------------------------------------------------
@pytest.mark.parametrize("max_norm", [0.05, 1e6])
def test_clip_matches_torch(max_norm):
    model = make_model("tiny-llama")
    accumulate(model, Optimizer([model], OptimConfig(), PrecisionConfig(), PS))
    params = list(model.parameters())
    holders = [torch.nn.Parameter(torch.zeros_like(p)) for p in params]
    for h, p in zip(holders, params):
        h.grad = p.grad.clone()
    ref_norm = torch.nn.utils.clip_grad_norm_(holders, max_norm)
    grads = [p.grad for p in params]
    norm = float(grad_norm_tensor(params, grads, PS))
    coef = clip_by_global_norm(grads, norm, max_norm)
    assert (coef < 1.0) == (max_norm < norm)
    # same formula and order as torch: the same float, the same clipped gradients
    assert norm == float(ref_norm)
    for g, h in zip(grads, holders):
        assert torch.equal(g, h.grad)


def test_nonfinite_norm_skips_step_in_fp32():
    model = make_model()
    opt = Optimizer([model], OptimConfig(), PrecisionConfig(), PS)
    accumulate(model, opt)
    before = copy.deepcopy(model.state_dict())
    next(model.parameters()).grad[0, 0] = float("nan")
    result = opt.step(1e-3)
    assert result.skipped and math.isnan(result.grad_norm)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# -- fp16 loss scaling -----------------------------------------------------------------------
def test_loss_scaler_rules():
    s = LossScaler(scale=8.0, dynamic=True, min_scale=2.0, window=3, hysteresis=2,
                   hysteresis_left=2)
    s.update(True)
    assert s.scale == 8.0                 # first overflow absorbed by hysteresis
    s.update(True)
    assert s.scale == 4.0
    s.update(True)
    assert s.scale == 2.0
    s.update(True)
    assert s.scale == 2.0                 # floor
    for _ in range(2):
        s.update(False)
    assert s.scale == 2.0
    s.update(False)
    assert s.scale == 4.0 and s.hysteresis_left == 2   # growth after `window` clean steps
    static = build_loss_scaler(PrecisionConfig(fp16=True, loss_scale=128.0))
    static.update(True)
    assert static.scale == 128.0 and not static.dynamic
    assert build_loss_scaler(PrecisionConfig(bf16=True)).scale == 1.0


def test_fp16_overflow_skips_step_and_halves_scale():
    model = make_model()
    prec = PrecisionConfig(fp16=True, initial_loss_scale=1024.0, hysteresis=1,
                           loss_scale_window=2)
    opt = Optimizer([model], OptimConfig(), prec, PS)
    assert all(p.dtype == torch.float16 for p in model.parameters())
    masters = [m.detach().clone() for m in opt.masters]
    params = [p.detach().clone() for p in model.parameters()]
    accumulate(model, opt)
    opt.params[0].main_grad[0, 0] = float("inf")          # an overflow in one gradient
    opt.finish_grad_sync()
    result = opt.step(1e-3)
    opt.zero_grad()
    assert result.skipped and result.loss_scale == 1024.0 and opt.loss_scale == 512.0
    assert all(torch.equal(a, b) for a, b in zip(masters, opt.masters))
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    # two clean steps: the scale grows back, and the steps really update
    for _ in range(2):
        _, result = train_step(model, opt)
        assert not result.skipped and math.isfinite(result.grad_norm)
    assert opt.loss_scale == 1024.0
    assert not all(torch.equal(a, b) for a, b in zip(masters, opt.masters))


def test_fp16_unscaled_grad_norm_matches_fp32():
    """The reported norm is of the unscaled gradient: equal to an fp32 model's within fp16
    rounding of the forward/backward (2e-2 relative, fp16 has an 11-bit significand)."""
    ref_model, model = make_model(), make_model()
    _, ref = train_step(ref_model, Optimizer([ref_model], OptimConfig(), PrecisionConfig(), PS))
    _, got = train_step(model, Optimizer([model], OptimConfig(),
                                         PrecisionConfig(fp16=True, initial_loss_scale=4096.0),
                                         PS))
    assert abs(got.grad_norm - ref.grad_norm) <= 2e-2 * ref.grad_norm


# -- bf16: fp32 master weights and fp32 accumulation -----------------------------------------
def test_bf16_main_grad_accumulates_in_fp32():
    model = make_model()
    opt = Optimizer([model], OptimConfig(), PrecisionConfig(bf16=True), PS)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    tokens, labels = batch()
    expected = [torch.zeros(p.shape) for p in opt.params]
    for m in range(2):
        sl = slice(m * MICRO, (m + 1) * MICRO)
        # the same microbatch's bf16 gradient, computed separately
        probe = copy.deepcopy(model)
        for p in probe.parameters():
            p._post_accumulate_grad_hooks = None
        torch.autograd.backward(probe(tokens[sl], labels[sl]).mean() / 2)
        for e, p in zip(expected, [dict(probe.named_parameters())[n] for n in _names(opt)]):
            e.add_(p.grad.float())
        opt.backward(model(tokens[sl], labels[sl]).mean() / 2, None)
    for p, e in zip(opt.params, expected):
        assert p.grad is None                       # half gradients are folded and freed
        assert p.main_grad.dtype == torch.float32
        assert torch.equal(p.main_grad, e)          # fp32 sum of the bf16 gradients, exactly


def _names(opt):
    return [n for g in opt.adamw.param_groups for n in g["names"]]


def test_bf16_masters_keep_updates_smaller_than_bf16_resolution():
    """lr so small that each update is below half a bf16 ulp of the weights: bf16 weights
    alone would never change, the fp32 masters accumulate them."""
    model = make_model()
    opt = Optimizer([model], OptimConfig(weight_decay=0.0, clip_grad=0.0),
                    PrecisionConfig(bf16=True), PS)
    start = [m.detach().clone() for m in opt.masters]
    for _ in range(3):
        train_step(model, opt, lr=1e-6)
    moved = sum(int((m != s).sum()) for m, s in zip(opt.masters, start))
    assert moved > 0.5 * sum(m.numel() for m in start)
    for p, m in zip(opt.params, opt.masters):
        assert torch.equal(p, m.to(torch.bfloat16))  # the model holds the rounded masters


def test_bf16_training_tracks_fp32():
    """5 steps on one batch: bf16 losses within 2e-2 relative of fp32 (bf16 keeps 8
    significant bits; the loss of a 300-way softmax is ~5.7, its bf16 rounding alone is ~2e-2)."""
    ref_model, model = make_model(), make_model()
    ref_opt = Optimizer([ref_model], OptimConfig(), PrecisionConfig(), PS)
    opt = Optimizer([model], OptimConfig(), PrecisionConfig(bf16=True), PS)
    ref_losses, losses = [], []
    for step in range(5):
        ref_losses.append(train_step(ref_model, ref_opt, lr=3e-3)[0])
        losses.append(train_step(model, opt, lr=3e-3)[0])
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) <= 2e-2 * b
    assert losses[-1] < losses[0] - 0.1          # it trains


# -- resume ----------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", [PrecisionConfig(), PrecisionConfig(bf16=True),
                                       PrecisionConfig(fp16=True, initial_loss_scale=256.0,
                                                       loss_scale_window=1)],
                         ids=["fp32", "bf16", "fp16"])
def test_state_dict_round_trip_is_bitwise(precision):
    optim = OptimConfig(weight_decay=0.1, clip_grad=0.5)
    model = make_model("tiny-llama")
    opt = Optimizer([model], optim, precision, PS)
    for step in range(2):
        train_step(model, opt, seed=step)
    saved_model = copy.deepcopy(model.state_dict())
    saved = copy.deepcopy(opt.state_dict())
    # continue the original run ...
    for step in range(2, 4):
        train_step(model, opt, seed=step)
    # ... and a fresh one resumed from the saved state (different init on purpose)
    resumed = make_model("tiny-llama", seed=99)
    ropt = Optimizer([resumed], optim, precision, PS)
    resumed.load_state_dict(saved_model)
    ropt.load_state_dict(saved)
    for step in range(2, 4):
        train_step(resumed, ropt, seed=step)
    for (n, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n
    assert ropt.loss_scale == opt.loss_scale


def test_state_from_before_the_fused_kernel_resumes_with_it():
    """A checkpoint saved by the per-tensor AdamW (its param groups say fused=None) loads into
    the fused optimizer, which still skips a non-finite step on the device (found_inf): the
    per-tensor implementation refuses found_inf, so the groups must be switched back."""
    model = make_model()
    opt = Optimizer([model], OptimConfig(), PrecisionConfig(), PS)
    train_step(model, opt)
    old = copy.deepcopy(opt.state_dict())
    for group in old["adamw"]["param_groups"]:
        group["fused"], group["foreach"] = None, None
    opt.load_state_dict(old)
    assert all(g["fused"] for g in opt.adamw.param_groups)
    accumulate(model, opt)
    before = copy.deepcopy(model.state_dict())
    next(model.parameters()).grad[0, 0] = float("inf")
    assert opt.step(1e-3).skipped
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    opt.zero_grad()
    train_step(model, opt)                          # and the next step is taken
    assert not all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_load_state_dict_refuses_other_layout():
    a = Optimizer([make_model("tiny")], OptimConfig(), PrecisionConfig(), PS)
    b = Optimizer([make_model("tiny-llama")], OptimConfig(), PrecisionConfig(), PS)
    with pytest.raises(MegaliteError, match="does not match"):
        b.load_state_dict(a.state_dict())
    c = Optimizer([make_model("tiny")], OptimConfig(), PrecisionConfig(bf16=True), PS)
    with pytest.raises(MegaliteError, match="precision"):
        c.load_state_dict(a.state_dict())


def test_bad_precision_is_a_clear_error():
    with pytest.raises(MegaliteError, match="fp32 training needs float32"):
        Optimizer([make_model().to(torch.bfloat16)], OptimConfig(), PrecisionConfig(), PS)
