"""The BERT model against Hugging Face's, its presets, loss, FLOPs and mock data.

Parity: megalite's ``BertModel`` with the weights of a Hugging Face ``BertForPreTraining``
(post-norm) or ``MegatronBertForPreTraining`` (pre-norm), mapped by the converter's name map,
gives the same masked-LM and binary-head logits within 1e-4 absolute in float32, on a batch
with padding and both token types. Why 1e-4: the same math in other kernels and summation
orders (SDPA vs eager attention) agrees to float32 rounding (~1e-6 measured over 2 layers with
O(1) logits); a mapping error (a swapped head, a norm in the wrong place) moves logits by ~1e-1.
The weights are redrawn at std 0.2 so logits are O(1) and the check is sensitive (asserted).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import (BertConfig, BertForMaskedLM, BertForPreTraining, MegatronBertConfig,
                          MegatronBertForPreTraining)

from hf_common import scale_up_
from megalite.convert import hf_bert
from megalite.data.batches import stacked_microbatch
from megalite.data.bert_dataset import MockBERTDataset
from megalite.distributed.parallel_state import ParallelState
from megalite.errors import MegaliteError
from megalite.families import family_of
from megalite.model import get_preset
from megalite.model.bert import BertModel
from megalite.model.flops import bert_forward_flops_per_token
from megalite.parallel.context import ModelContext
from megalite.training.loss import BERTLoss

TOL = 1e-4
HF = {"post": (BertForPreTraining, BertConfig), "pre": (MegatronBertForPreTraining,
                                                        MegatronBertConfig)}
SHAPE = dict(vocab_size=203, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=64, max_position_embeddings=40, hidden_dropout_prob=0.0,
             attention_probs_dropout_prob=0.0)


def _pair(placement: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model_class, config_class = HF[placement]
    hf = scale_up_(model_class(config_class(**{**SHAPE, **overrides}))).eval()
    cfg = hf_bert.config_from_hf(hf.config, set(hf.state_dict()))
    ours = BertModel(cfg, ModelContext(ParallelState.single())).eval()
    ours.load_full_state_dict(hf_bert.from_hf(hf.state_dict(), cfg))
    return hf, ours, cfg


def _batch(n=3, s=17, vocab=203):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, vocab, (n, s), generator=g)
    types = torch.zeros(n, s, dtype=torch.long)
    types[:, s // 2:] = 1
    mask = torch.ones(n, s, dtype=torch.long)
    mask[1, 12:] = 0                                   # a padded sequence
    return ids, types, mask


@pytest.mark.parametrize("placement", ["post", "pre"])
@torch.no_grad()
def test_logits_equal_hugging_face(placement):
    hf, ours, cfg = _pair(placement)
    assert cfg.norm_placement == placement and cfg.bert_binary_head and cfg.tokentypes == 2
    ids, types, mask = _batch()
    out = hf(input_ids=ids, token_type_ids=types, attention_mask=mask)
    lm, binary = ours(ids, mask, types)
    assert lm.shape == (3, 17, cfg.padded_vocab(1))
    real = mask.bool()                  # padded positions are never read (loss mask 0)
    err = (lm[..., :cfg.vocab_size] - out.prediction_logits)[real].abs().max().item()
    assert out.prediction_logits.abs().max() > 1.0          # O(1) logits: a sensitive check
    assert err < TOL, f"{placement}-norm masked-LM logits differ by {err:.2e}"
    assert (binary - out.seq_relationship_logits).abs().max().item() < TOL
    # the vocabulary padding is never predicted
    assert (lm[..., cfg.vocab_size:] == torch.finfo(lm.dtype).min).all()


@torch.no_grad()
def test_no_binary_head_equals_masked_lm_model():
    torch.manual_seed(1)
    hf = scale_up_(BertForMaskedLM(BertConfig(**SHAPE))).eval()
    cfg = hf_bert.config_from_hf(hf.config, set(hf.state_dict()))
    assert not cfg.bert_binary_head and cfg.tokentypes == 2
    ours = BertModel(cfg, ModelContext(ParallelState.single())).eval()
    ours.load_full_state_dict(hf_bert.from_hf(hf.state_dict(), cfg))
    ids, types, mask = _batch()
    lm, binary = ours(ids, mask, types)
    assert binary is None and not hasattr(ours, "pooler")
    err = (lm[..., :203] - hf(input_ids=ids, token_type_ids=types, attention_mask=mask).logits)
    assert err[mask.bool()].abs().max().item() < TOL


@pytest.mark.parametrize("placement", ["post", "pre"])
def test_state_dict_round_trip_is_bitwise(placement):
    hf, ours, cfg = _pair(placement, seed=2)
    back = hf_bert.to_hf(ours.full_state_dict(), cfg)
    theirs = hf.state_dict()
    assert set(back) == set(theirs)
    for name, t in theirs.items():
        assert torch.equal(back[name], t), name


def test_megatron_no_binary_head_has_no_token_types_and_exports_a_zero_row():
    # Megatron-LM: --bert-no-binary-head also drops the token-type embedding (pretrain_bert.py)
    cfg = get_preset("tiny-bert").replace(bert_binary_head=False)
    assert cfg.tokentypes == 0
    model = BertModel(cfg, ModelContext(ParallelState.single()))
    model.init_weights(3)
    assert not hasattr(model.embedding, "tokentype_embeddings")
    hf_state = hf_bert.to_hf(model.full_state_dict(), cfg)
    assert torch.equal(hf_state["bert.embeddings.token_type_embeddings.weight"],
                       torch.zeros(1, cfg.hidden_size))
    assert hf_bert.hf_architecture(cfg) == "MegatronBertForMaskedLM"


@pytest.mark.parametrize("name, hf_shape", [
    ("bert-base", {}),
    ("bert-large", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                        intermediate_size=4096)),
])
def test_preset_parameter_counts_equal_hugging_face(name, hf_shape):
    with torch.device("meta"):
        hf = BertForPreTraining(BertConfig(**hf_shape))
    cfg = get_preset(name)
    theirs = hf_bert.config_from_hf(hf.config, set(hf.state_dict()))
    shape = ("num_layers", "hidden_size", "num_attention_heads", "ffn_size", "vocab_size",
             "max_position_embeddings", "norm_placement", "tokentypes", "layernorm_epsilon",
             "activation", "bert_binary_head", "tied_embeddings")
    assert [getattr(theirs, k) for k in shape] == [getattr(cfg, k) for k in shape]
    ours = BertModel(cfg, ModelContext(ParallelState.single(), device="meta"))
    padding = cfg.padded_vocab(1) - cfg.vocab_size        # rows of the embedding and bias
    count = sum(p.numel() for p in ours.parameters()) - padding * (cfg.hidden_size + 1)
    assert count == sum(p.numel() for p in hf.parameters())


def test_loss_is_megatron_masked_mean_plus_sentence_order():
    g = torch.Generator().manual_seed(0)
    per_token = torch.rand(2, 6, generator=g, requires_grad=True)
    binary = torch.randn(2, 2, generator=g, requires_grad=True)
    mb = {"loss_mask": torch.tensor([[0, 1, 1, 0, 0, 1], [1, 0, 0, 0, 0, 0]]),
          "is_random": torch.tensor([1, 0])}
    scaled, reported = BERTLoss(num_microbatches=4, loss_scale=8.0)((per_token, binary), mb)
    # Megatron-LM's pretrain_bert.py loss_func, written out
    lm = (per_token * mb["loss_mask"]).sum() / mb["loss_mask"].sum()
    sop = -(F.log_softmax(binary, -1)[[0, 1], [1, 0]]).mean()
    assert torch.allclose(reported, lm + sop, rtol=1e-6, atol=0)
    assert torch.allclose(scaled, (lm + sop) * 8.0 / 4, rtol=1e-6, atol=0)
    without, _ = BERTLoss(1)((per_token, None), mb)
    assert torch.allclose(without, lm, rtol=1e-6, atol=0)


def test_flops_count_full_attention_and_the_heads():
    cfg = get_preset("tiny-bert")
    h, L, V, s, f = 64, 2, 1000, 16, 256
    per_layer = 2 * h * 3 * h + 4 * h * s + 2 * h * h + 2 * 2 * h * f
    expected = L * per_layer + 2 * h * h + 2 * h * V + (2 * h * h + 4 * h) / s
    assert math.isclose(bert_forward_flops_per_token(cfg, s), expected, rel_tol=1e-12)
    assert family_of(cfg).flops_per_iteration(cfg, 3, s) == 3 * 3 * s * expected
    no_head = cfg.replace(bert_binary_head=False)
    assert bert_forward_flops_per_token(no_head, s) == expected - (2 * h * h + 4 * h) / s


def test_mock_data_samples_are_bert_samples():
    ds = MockBERTDataset(vocab_size=50, seq_length=32, num_samples=4, seed=9)
    a, b = ds[2], MockBERTDataset(50, 32, 4, 9)[2]
    assert all(np.array_equal(a[k], b[k]) for k in a)           # a function of (seed, i)
    batch = stacked_microbatch([ds[i] for i in range(4)])
    assert batch["text"].shape == (4, 32) and batch["is_random"].shape == (4,)
    t = a["text"]
    assert t[0] == ds.CLS and t[-1] == ds.SEP and (t == ds.SEP).sum() == 2
    masked = a["loss_mask"] == 1
    assert masked.sum() == round(29 * 0.15) and (t[masked] == ds.MASK).all()
    assert (a["labels"][masked] >= 4).all() and (a["labels"][~masked] == -1).all()
    with pytest.raises(MegaliteError, match="vocab-size > 4"):
        MockBERTDataset(4, 32, 1, 0)


def test_bert_config_is_checked():
    with pytest.raises(MegaliteError, match="norm_placement 'post' is for BERT"):
        get_preset("tiny").replace(norm_placement="post")
    with pytest.raises(MegaliteError, match="learned absolute positions and a gelu MLP"):
        get_preset("tiny-bert").replace(activation="swiglu")
    with pytest.raises(MegaliteError, match="token types are for BERT"):
        get_preset("tiny").replace(num_tokentypes=2)
