"""A minimal plain-PyTorch GPT training loop: the baseline for ``benchmarks/train_step.py``.

nanoGPT-style and deliberately independent of megalite's model code: ``torch.nn`` modules,
batch-first activations ``[b, s, h]``, ``F.scaled_dot_product_attention``, ``F.cross_entropy``,
``torch.nn.utils.clip_grad_norm_`` and ``torch.optim.AdamW``. Both recipes:

* ``classic``: learned absolute positions, LayerNorm, exact GELU, biases, tied output layer;
* ``llama``: rotary positions, RMSNorm, SwiGLU (gate and up fused in one GEMM, as a careful
  plain implementation would), grouped-query attention, no biases, untied output layer.

Parameter names (``wte``, ``h.{i}.attn.c_attn``, ...) follow nanoGPT. ``c_attn``'s rows are
``[Q (a*d); K (g*d); V (g*d)]`` and, for SwiGLU, ``c_fc``'s rows are ``[gate (f); up (f)]``.
:func:`from_megalite_state_dict` maps a megalite full state dict (TP=1 names and layouts) onto
these names, so both loops can start from the same weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class BaselineConfig:
    """Shapes and recipe of the baseline model (mirrors the megalite model being compared)."""

    recipe: str
    """"classic" or "llama" (see the module docstring)."""
    num_layers: int
    """Transformer blocks."""
    hidden_size: int
    """Residual width h."""
    num_heads: int
    """Query heads a."""
    num_kv_heads: int
    """Key/value heads g (= a without grouped-query attention)."""
    ffn_size: int
    """MLP inner width f (each of gate and up for SwiGLU)."""
    vocab_size: int
    """Vocabulary V (a multiple of 128 in the benchmark, so megalite pads nothing)."""
    seq_length: int
    """Sequence length s (= rows of the learned position table)."""
    eps: float = 1e-5
    """Norm epsilon."""
    rope_base: float = 10000.0
    """RoPE theta (llama recipe)."""

    @property
    def head_dim(self) -> int:
        """Per-head width d = h / a."""
        return self.hidden_size // self.num_heads


def _rope_tables(seq_length: int, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos, sin [s, d] for the rotate-half convention (angle pos * base^(-2i/d))."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(seq_length).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [b, n, s, d] rotated by (cos, sin) [s, d]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Block(nn.Module):
    """Pre-norm transformer block on [b, s, h]."""

    def __init__(self, c: BaselineConfig):
        super().__init__()
        llama = c.recipe == "llama"
        norm = (lambda: nn.RMSNorm(c.hidden_size, eps=c.eps)) if llama else \
            (lambda: nn.LayerNorm(c.hidden_size, eps=c.eps))
        bias = not llama
        d = c.head_dim
        self.c, self.llama = c, llama
        self.ln_1, self.ln_2 = norm(), norm()
        self.attn = nn.Module()
        self.attn.c_attn = nn.Linear(c.hidden_size, (c.num_heads + 2 * c.num_kv_heads) * d,
                                     bias=bias)
        self.attn.c_proj = nn.Linear(c.num_heads * d, c.hidden_size, bias=bias)
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(c.hidden_size, (2 if llama else 1) * c.ffn_size, bias=bias)
        self.mlp.c_proj = nn.Linear(c.ffn_size, c.hidden_size, bias=bias)

    def attention(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        c, (b, s, _) = self.c, x.shape
        a, g, d = c.num_heads, c.num_kv_heads, c.head_dim
        q, k, v = self.attn.c_attn(x).split([a * d, g * d, g * d], dim=-1)
        q = q.view(b, s, a, d).transpose(1, 2)                  # [b, a, s, d]
        k = k.view(b, s, g, d).transpose(1, 2)                  # [b, g, s, d]
        v = v.view(b, s, g, d).transpose(1, 2)
        if rope is not None:
            q, k = _rotate(q, *rope), _rotate(k, *rope)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=g != a)
        return self.attn.c_proj(y.transpose(1, 2).reshape(b, s, a * d))

    def mlp_forward(self, x: Tensor) -> Tensor:
        u = self.mlp.c_fc(x)
        if self.llama:
            gate, up = u.chunk(2, dim=-1)
            u = F.silu(gate) * up
        else:
            u = F.gelu(u)
        return self.mlp.c_proj(u)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        x = x + self.attention(self.ln_1(x), rope)
        return x + self.mlp_forward(self.ln_2(x))


class BaselineGPT(nn.Module):
    """``forward(idx [b, s], targets [b, s]) -> mean cross-entropy`` (scalar)."""

    def __init__(self, c: BaselineConfig):
        super().__init__()
        self.c = c
        llama = c.recipe == "llama"
        self.wte = nn.Embedding(c.vocab_size, c.hidden_size)
        if not llama:
            self.wpe = nn.Embedding(c.seq_length, c.hidden_size)
        self.h = nn.ModuleList(Block(c) for _ in range(c.num_layers))
        self.ln_f = nn.RMSNorm(c.hidden_size, eps=c.eps) if llama else \
            nn.LayerNorm(c.hidden_size, eps=c.eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if not llama:
            self.lm_head.weight = self.wte.weight                 # tied
        if llama:
            cos, sin = _rope_tables(c.seq_length, c.head_dim, c.rope_base)
            self.register_buffer("cos", cos, persistent=False)
            self.register_buffer("sin", sin, persistent=False)

    def forward(self, idx: Tensor, targets: Tensor) -> Tensor:
        s = idx.shape[1]
        x = self.wte(idx)
        rope = None
        if self.c.recipe == "llama":
            rope = (self.cos[:s], self.sin[:s])
        else:
            x = x + self.wpe(torch.arange(s, device=idx.device))
        for block in self.h:
            x = block(x, rope)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


def from_megalite_state_dict(sd: dict[str, Tensor], c: BaselineConfig) -> dict[str, Tensor]:
    """A megalite TP=1 full state dict -> this model's state dict (same weights).

    megalite stores the fused QKV grouped: per key/value group, its a/g query heads, then its
    key head, then its value head ([g, a/g + 2, d, h]); here Q, K, V are stacked whole.
    """
    a, g, d = c.num_heads, c.num_kv_heads, c.head_dim
    out = {"wte.weight": sd["embedding.word_embeddings.weight"][:c.vocab_size]}
    if c.recipe == "classic":
        out["wpe.weight"] = sd["embedding.position_embeddings.weight"][:c.seq_length]
    else:
        out["lm_head.weight"] = sd["output_layer.weight"][:c.vocab_size]

    def qkv(t: Tensor) -> Tensor:
        grouped = t.reshape(g, a // g + 2, d, *t.shape[1:])
        q = grouped[:, :a // g].reshape(a * d, *t.shape[1:])
        k = grouped[:, a // g].reshape(g * d, *t.shape[1:])
        v = grouped[:, a // g + 1].reshape(g * d, *t.shape[1:])
        return torch.cat([q, k, v])

    names = {"input_norm": "ln_1", "post_attention_norm": "ln_2",
             "attention.linear_qkv": "attn.c_attn", "attention.linear_proj": "attn.c_proj",
             "mlp.linear_fc1": "mlp.c_fc", "mlp.linear_fc2": "mlp.c_proj"}
    for i in range(c.num_layers):
        for src, dst in names.items():
            for kind in ("weight", "bias"):
                key = f"layers.{i}.{src}.{kind}"
                if key in sd:
                    t = sd[key]
                    out[f"h.{i}.{dst}.{kind}"] = qkv(t) if src.endswith("qkv") else t
    for kind in ("weight", "bias"):
        if f"final_norm.{kind}" in sd:
            out[f"ln_f.{kind}"] = sd[f"final_norm.{kind}"]
    if c.recipe == "classic":
        out["lm_head.weight"] = out["wte.weight"]
    return out


def cosine_lr(it: int, lr: float, min_lr: float, warmup: int, decay: int) -> float:
    """Learning rate after ``it`` optimizer steps, used by the next one (Megatron-LM's rule,
    which megalite follows: linear warmup from 0, so the first step runs at lr 0; cosine decay
    to min_lr)."""
    if it <= warmup:
        return lr * it / warmup
    if it >= decay:
        return min_lr
    r = (it - warmup) / (decay - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * r))


class BaselineLoop:
    """The training step: batch -> forward/backward (gradient accumulation) -> clip -> AdamW.

    ``dataset[i]`` is an int64 array of ``s + 1`` tokens; global batch ``k`` is samples
    ``[k G, (k+1) G)`` cut into microbatches of ``micro`` consecutive samples (the usual
    pretraining order, so it sees the same batches as megalite at DP=1).
    """

    def __init__(self, model: BaselineGPT, dataset, *, micro: int, global_batch: int,
                 lr: float, min_lr: float, warmup: int, decay: int, weight_decay: float,
                 betas: tuple[float, float], eps: float, clip: float, device=None):
        self.model, self.dataset = model, dataset
        self.device = device or next(model.parameters()).device   # where the batches go
        self.micro, self.global_batch = micro, global_batch
        self.sched = (lr, min_lr, warmup, decay)
        self.clip = clip
        params = [p for p in model.parameters() if p.requires_grad]
        decay_p = [p for p in params if p.dim() >= 2]
        plain_p = [p for p in params if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay_p, "weight_decay": weight_decay},
                                      {"params": plain_p, "weight_decay": 0.0}],
                                     lr=lr, betas=betas, eps=eps)
        self.iteration = 0

    def get_batch(self, ids: list[int]) -> tuple[Tensor, Tensor]:
        data = torch.from_numpy(np.stack([self.dataset[i] for i in ids])).to(self.device)
        return data[:, :-1].contiguous(), data[:, 1:].contiguous()

    def step(self) -> float:
        """One optimizer step over the next global batch; returns its mean loss."""
        self.model.train()
        base = self.iteration * self.global_batch
        self.iteration += 1
        n_micro = self.global_batch // self.micro
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        for j in range(n_micro):
            x, y = self.get_batch(list(range(base + j * self.micro, base + (j + 1) * self.micro)))
            loss = self.model(x, y)
            (loss / n_micro).backward()
            total += loss.item()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        lr = cosine_lr(self.iteration - 1, *self.sched)   # steps done before this one
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        return total / n_micro
