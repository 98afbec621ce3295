"""The encoder-decoder family (model_type "t5"): the original Transformer against
``torch.nn.Transformer`` with the same weights, config checks, preset counts, FLOPs and
recomputation.

Tolerance of the nn.Transformer parity: 1e-5 absolute on logits of scale ~10-40 (float32).
Both sides compute the same math (post-norm or pre-norm layers, SDPA attention, LayerNorm);
only kernel choice and summation order may differ, i.e. float32 rounding, far below any
mapping error (a swapped q/k/v block or norm moves logits by O(1)). In practice they agree
bit for bit on CPU. Compared only where the decoder has a token (outputs at padding positions
are not defined by either).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from megalite.convert.hf_t5 import _join_kv
from megalite.convert.mapping import qkv_to_grouped
from megalite.distributed.parallel_state import ParallelState
from megalite.errors import MegaliteError
from megalite.families import family_of
from megalite.model import get_preset
from megalite.model.config import TransformerConfig
from megalite.model.flops import encoder_decoder_forward_flops
from megalite.model.encoder_decoder import EncoderDecoderModel
from megalite.parallel.context import ModelContext

TOL = 1e-5
V, H, A, F, L, LD = 211, 64, 4, 96, 2, 3


def classic_config(**changes) -> TransformerConfig:
    base = dict(model_type="t5", num_layers=L, decoder_num_layers=LD, hidden_size=H,
                num_attention_heads=A, vocab_size=V, ffn_hidden_size=F,
                max_position_embeddings=64, position_embedding_type="sinusoidal",
                normalization="LayerNorm", norm_placement="post", activation="relu",
                add_bias_linear=True, scale_embedding=True, layernorm_epsilon=1e-5)
    base.update(changes)
    return TransformerConfig(**base)


def state_from_torch_transformer(tr: nn.Transformer, embedding: nn.Embedding) -> dict:
    """megalite's full state dict of nn.Transformer + one embedding (tied output layer)."""
    sd = tr.state_dict()
    state = {"embedding.word_embeddings.weight": embedding.weight.detach()}

    def pair(dst: str, src: str) -> None:
        state[dst + ".weight"], state[dst + ".bias"] = sd[src + ".weight"], sd[src + ".bias"]

    for stack, count in (("encoder", L), ("decoder", LD)):
        for i in range(count):
            p = f"{stack}.layers.{i}."
            w, b = sd[p + "self_attn.in_proj_weight"], sd[p + "self_attn.in_proj_bias"]
            state[p + "attention.linear_qkv.weight"] = qkv_to_grouped(*w.chunk(3), A)
            state[p + "attention.linear_qkv.bias"] = qkv_to_grouped(*b.chunk(3), A)
            pair(p + "attention.linear_proj", p + "self_attn.out_proj")
            pair(p + "input_norm", p + "norm1")
            pair(p + "mlp.linear_fc1", p + "linear1")
            pair(p + "mlp.linear_fc2", p + "linear2")
            mlp_norm = "norm2"
            if stack == "decoder":
                w, b = sd[p + "multihead_attn.in_proj_weight"], sd[p + "multihead_attn.in_proj_bias"]
                (wq, wk, wv), (bq, bk, bv) = w.chunk(3), b.chunk(3)
                c = p + "cross_attention."
                state[c + "linear_q.weight"], state[c + "linear_q.bias"] = wq, bq
                state[c + "linear_kv.weight"] = _join_kv(wk, wv, A)
                state[c + "linear_kv.bias"] = _join_kv(bk, bv, A)
                pair(c + "linear_proj", p + "multihead_attn.out_proj")
                pair(p + "cross_attention_norm", p + "norm2")
                mlp_norm = "norm3"
            pair(p + "post_attention_norm", p + mlp_norm)
        pair(f"{stack}.final_norm", f"{stack}.norm")
    return state


def sinusoids(n: int, dim: int) -> torch.Tensor:
    """The paper's table, computed here independently of megalite (float64, then float32)."""
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    angle = pos / torch.pow(10000.0, torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    pe = torch.zeros(n, dim, dtype=torch.float64)
    pe[:, 0::2], pe[:, 1::2] = angle.sin(), angle.cos()
    return pe.float()


def reference_logits(tr, embedding, src, tgt, enc_mask=None, dec_mask=None):
    """Embedding x sqrt(h) + sinusoids -> nn.Transformer -> tied output layer, [b, s, V]."""
    pe = sinusoids(64, H)
    s = embedding(src).transpose(0, 1) * math.sqrt(H) + pe[:src.shape[1], None]
    t = embedding(tgt).transpose(0, 1) * math.sqrt(H) + pe[:tgt.shape[1], None]
    pad_src = None if enc_mask is None else enc_mask == 0
    y = tr(s, t, tgt_mask=nn.Transformer.generate_square_subsequent_mask(tgt.shape[1]),
           src_key_padding_mask=pad_src, memory_key_padding_mask=pad_src,
           tgt_key_padding_mask=None if dec_mask is None else dec_mask == 0, tgt_is_causal=True)
    return (y @ embedding.weight.t()).transpose(0, 1)


def batch():
    g = torch.Generator().manual_seed(1)
    src, tgt = torch.randint(0, V, (2, 20), generator=g), torch.randint(0, V, (2, 15), generator=g)
    enc_mask = torch.ones(2, 20, dtype=torch.long)
    enc_mask[1, 12:] = 0
    dec_mask = torch.ones(2, 15, dtype=torch.long)
    dec_mask[0, 11:] = 0
    return src, tgt, enc_mask, dec_mask


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.filterwarnings("ignore::UserWarning")   # nn.Transformer's nested-tensor notices
def test_classic_transformer_equals_torch_nn_transformer(norm_first):
    torch.manual_seed(0)
    tr = nn.Transformer(H, A, L, LD, F, dropout=0.0, norm_first=norm_first).eval()
    embedding = nn.Embedding(V, H)
    with torch.no_grad():          # norms and biases away from 1 and 0, so a mix-up shows
        for name, p in tr.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif p.dim() == 1:
                p.normal_(0.0, 0.1)
    cfg = classic_config(norm_placement="pre" if norm_first else "post")
    ours = EncoderDecoderModel(cfg, ModelContext(ParallelState.single())).eval()
    ours.load_full_state_dict(state_from_torch_transformer(tr, embedding))
    src, tgt, enc_mask, dec_mask = batch()
    with torch.no_grad():
        theirs = reference_logits(tr, embedding, src, tgt)
        assert theirs.abs().max() > 5.0
        err = (ours(src, tgt)[..., :V] - theirs).abs().max().item()
        assert err <= TOL, err
        theirs = reference_logits(tr, embedding, src, tgt, enc_mask, dec_mask)
        mine = ours(src, tgt, enc_mask=enc_mask, dec_mask=dec_mask)[..., :V]
        real = dec_mask.bool()
        assert (mine - theirs).abs()[real].max().item() <= TOL
        # the masks matter: without them the real positions of row 1 see the padding
        unmasked = ours(src, tgt)[..., :V]
        assert (unmasked - theirs).abs()[real].max().item() > 1e-2


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_transformer_base_preset_counts_nn_transformer_and_one_embedding():
    cfg = get_preset("transformer-base")
    model = EncoderDecoderModel(cfg, ModelContext(ParallelState.single(), device="meta"))
    with torch.device("meta"):
        tr = nn.Transformer(512, 8, 6, 6, 2048)
    expected = sum(p.numel() for p in tr.parameters()) + cfg.vocab_size * 512
    padding = (model.padded_vocab - cfg.vocab_size) * 512
    assert sum(p.numel() for p in model.parameters()) - padding == expected == 63_084_544


@pytest.mark.parametrize("changes, match", [
    (dict(model_type="gpt2"), "model_type must be one of"),
    (dict(norm_placement="middle"), "norm_placement must be one of"),
    (dict(model_type="gpt", norm_placement="pre", position_embedding_type="relative"),
     "needs model_type 't5'"),
    (dict(model_type="gpt", norm_placement="pre", decoder_num_layers=None,
          decoder_seq_length=8), "decoder_seq_length is for model_type 't5'"),
    (dict(decoder_start_token_id=V), "decoder_start_token_id must be an id in"),
    (dict(softmax_scale=0.0), "softmax_scale must be > 0"),
    (dict(relative_attention_num_buckets=2), "relative_attention_num_buckets must be"),
    (dict(decoder_seq_length=65), "decoder_seq_length=65 exceeds max_position_embeddings"),
])
def test_config_rejects_bad_encoder_decoder_fields(changes, match):
    changes.setdefault("decoder_num_layers", LD)
    with pytest.raises(MegaliteError, match=match):
        classic_config(**changes)


def test_model_refuses_other_families_and_pipelines():
    with pytest.raises(MegaliteError, match="needs model_type 't5'"):
        EncoderDecoderModel(get_preset("tiny"), ModelContext(ParallelState.single()))
    ps = ParallelState.for_shapes(1, 0, 2, 0)
    with pytest.raises(MegaliteError, match="no pipeline-parallel implementation"):
        EncoderDecoderModel(get_preset("tiny-t5"), ModelContext(ps, device="meta"))


def test_flops_of_an_encoder_decoder_by_hand_and_by_torch_counter():
    cfg = get_preset("tiny-t5")           # h=64, a=4, d=16, f=128 gated, L=2+2, V=1000
    h, a, d, f, V_ = 64, 4, 16, 128, 1000
    t, s, b = 24, 10, 2

    def layer(score):
        return 2 * h * 3 * a * d + score + 2 * a * d * h + 2 * 3 * h * f
    encoder = t * 2 * layer(4 * a * d * t)
    cross = 2 * h * a * d + 4 * a * d * t + 2 * a * d * h
    decoder = s * (2 * (layer(2 * a * d * s) + cross) + 2 * h * V_)
    sample = encoder + t * 2 * 4 * h * a * d + decoder
    assert encoder_decoder_forward_flops(cfg, t, s) == sample
    # the family's formula: samples of t encoder and decoder_seq_length decoder tokens
    per_iteration = family_of(cfg).flops_per_iteration(cfg.replace(decoder_seq_length=s), b, t)
    assert per_iteration == pytest.approx(3 * b * sample, rel=1e-12)
    with pytest.raises(MegaliteError, match="decoder_seq_length"):
        family_of(cfg).flops_per_iteration(cfg.replace(decoder_seq_length=None), b, t)
    # torch's counter sees every GEMM of a real step except CPU SDPA's fused kernels, which
    # run without a mask: the original Transformer's switches (no position bias), no padding.
    cfg = classic_config()
    h, a, d, f, V_ = H, A, H // A, F, V

    def layer2(score):
        return 2 * h * 3 * a * d + score + 2 * a * d * h + 2 * 2 * h * f
    expected = 3 * b * (t * L * layer2(4 * a * d * t) + t * LD * 4 * h * a * d + s * (
        LD * (layer2(2 * a * d * s) + 2 * h * a * d + 4 * a * d * t + 2 * a * d * h)
        + 2 * h * V_))
    assert 3 * b * encoder_decoder_forward_flops(cfg, t, s) == expected
    model = EncoderDecoderModel(cfg, ModelContext(ParallelState.single()))
    model.init_weights(seed=1)
    g = torch.Generator().manual_seed(0)
    src, tgt = torch.randint(0, V_, (b, t), generator=g), torch.randint(0, V_, (b, s), generator=g)
    with FlopCounterMode(display=False) as counter:
        model(src, tgt, tgt).sum().backward()
    cores = 3 * b * (t * L * 4 * a * d * t + s * LD * (2 * a * d * s + 4 * a * d * t))
    padding = 3 * b * s * 2 * h * (model.padded_vocab - V_)
    assert counter.get_total_flops() == expected - cores + padding


@pytest.mark.parametrize("granularity", ["full", "selective"])
def test_recompute_gives_the_same_gradients(granularity):
    cfg = get_preset("tiny-t5").replace(hidden_dropout=0.1, attention_dropout=0.1)
    src, tgt, enc_mask, dec_mask = batch()
    src, tgt = src % 1000, tgt % 1000
    grads = []
    for c in (cfg, cfg.replace(recompute_granularity=granularity)):
        torch.manual_seed(3)     # the same dropout masks, drawn again in the recompute
        model = EncoderDecoderModel(c, ModelContext(ParallelState.single()))
        model.init_weights(seed=2)
        loss = model(src, tgt, tgt, enc_mask=enc_mask, dec_mask=dec_mask)
        (loss * dec_mask).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert g.abs().max() > 0, name
        assert torch.equal(g, grads[1][name]), name
