"""Encoder-decoder generation: the KV cache (decoder self-attention cached, cross-attention
keys/values computed once) gives exactly the tokens and logits of re-running the whole decoder
each step; the special ids and the text of ``megalite generate`` for T5 checkpoints.

Tolerance: the cached and uncached logits are compared at 1e-5 relative, max|cache - full| <=
1e-5 * max|full| per step (float32; the same math on fewer rows, so only the kernels' blocking
and summation order differ: a few ulps at the logits' scale, as for GPT in test_generate.py),
and the tokens exactly.
"""
from __future__ import annotations

import pytest
import torch

from megalite.distributed.parallel_state import ParallelState
from megalite.errors import MegaliteError
from megalite.inference import KVCache, SamplingConfig, generate_seq2seq_tokens
from megalite.inference.seq2seq_tokens import Seq2SeqIds, encode_prompt, seq2seq_ids, seq2seq_text
from megalite.model import get_preset
from megalite.model.encoder_decoder import EncoderDecoderModel
from megalite.parallel.context import ModelContext

MODELS = {
    # T5 does not scale its attention scores by 1/sqrt(d): a smaller init keeps them moderate
    "t5": get_preset("tiny-t5").replace(init_method_std=0.1),
    # untied: a random tied post-norm model repeats its largest embedding row
    "transformer": get_preset("transformer-base").replace(
        num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96,
        vocab_size=1000, max_position_embeddings=64, seq_length=None, decoder_seq_length=None,
        init_method_std=0.05,
        untie_embeddings_and_output_weights=True),
}


def model_of(name):
    model = EncoderDecoderModel(MODELS[name], ModelContext(ParallelState.single())).eval()
    model.init_weights(seed=5)
    return model


def source():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 1000, (2, 13), generator=g)
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, 9:] = 0
    return ids, mask


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("sampled", [False, True])
def test_cache_equals_recomputing_the_decoder(name, sampled):
    model = model_of(name)
    ids, mask = source()
    sampling = (SamplingConfig(greedy=False, temperature=0.8, top_k=40) if sampled
                else SamplingConfig())
    outs = [generate_seq2seq_tokens(model, ids, 20, sampling, start=3, source_mask=mask,
                                    use_cache=cache, keep_logits=True,
                                    generator=torch.Generator().manual_seed(9))
            for cache in (True, False)]
    assert outs[0].tokens.shape == (2, 20)
    assert torch.equal(outs[0].tokens, outs[1].tokens)
    for a, b in zip(outs[0].logits, outs[1].logits):
        assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()
    assert len(set(outs[0].tokens[0].tolist())) > 3        # not a constant output
    # the padded source positions matter only through the mask: other padding ids, same output
    other = ids.clone()
    other[1, 9:] = 7
    again = generate_seq2seq_tokens(model, other, 20, sampling, start=3, source_mask=mask,
                                    generator=torch.Generator().manual_seed(9))
    assert torch.equal(again.tokens, outs[0].tokens)


def test_cross_attention_keys_are_computed_once():
    model = model_of("t5")
    ids, _ = source()
    calls = []
    for layer in model.decoder.layers.values():
        layer.cross_attention.linear_kv.register_forward_hook(lambda *a: calls.append(1))
    generate_seq2seq_tokens(model, ids, 6, SamplingConfig(), start=3)
    assert len(calls) == len(model.decoder.layers)           # once per layer, not per step
    cache = KVCache.for_model(model, 2, 6)
    assert set(cache.keys) == set(range(MODELS["t5"].decoder_layers))


def test_eod_stops_rows_and_bad_arguments_are_refused():
    model = model_of("t5")
    ids, _ = source()
    first = generate_seq2seq_tokens(model, ids, 5, SamplingConfig(), start=3).tokens
    eod = int(first[0, 1])                  # row 0 ends at its second token
    out = generate_seq2seq_tokens(model, ids, 5, SamplingConfig(), start=3, eod=eod)
    assert out.finished[0] and out.tokens[0, 1] == eod and torch.all(out.tokens[0, 1:] == eod)
    with pytest.raises(MegaliteError, match="decoder start id 1000 is outside"):
        generate_seq2seq_tokens(model, ids, 5, SamplingConfig(), start=1000)
    with pytest.raises(MegaliteError, match=r"source ids must be in \[0, 1000\)"):
        generate_seq2seq_tokens(model, ids + 1000, 5, SamplingConfig(), start=3)
    classic = model_of("transformer")
    with pytest.raises(MegaliteError, match="65 new tokens exceed the decoder's"):
        generate_seq2seq_tokens(classic, ids, 65, SamplingConfig(), start=3)


def test_wordpiece_t5_starts_with_bos_and_stops_at_eos(wordpiece_vocab):
    from megalite.data.masked_dataset import masked_lm_vocab
    from megalite.data.tokenizers import build_tokenizer
    tok = build_tokenizer("BertWordPieceLowerCase", vocab_file=wordpiece_vocab)
    vocab = masked_lm_vocab(tok, vocab_extra_ids=3)
    cfg = get_preset("tiny-t5").replace(vocab_size=vocab.size)
    ids = seq2seq_ids(tok, cfg, {"data": {"vocab_extra_ids": 3}})
    assert (ids.start, ids.stop) == (vocab.bos, vocab.eos) == (tok.vocab_size, tok.vocab_size + 1)
    text = seq2seq_text(tok, tok.encode("the os module") + [vocab.sentinels[1]] +
                        tok.encode("provides"), ids)
    assert text == "the os module <extra_id_1> provides"
    # a prompt names sentinels as the output does: they are the sentinel ids, not text
    s0, s1, s2 = vocab.sentinels
    assert encode_prompt(tok, "The os module <extra_id_1>provides<extra_id_0>", ids) == \
        tok.encode("the os module") + [s1] + tok.encode("provides") + [s0]
    assert encode_prompt(tok, "<extra_id_2> [EOS]<extra_id_3>", ids) == \
        [s2, vocab.eos] + tok.encode("<extra_id_3>")   # only 3 sentinels: _3 stays text
    assert encode_prompt(tok, "no sentinel", Seq2SeqIds(0, 1)) == tok.encode("no sentinel")
    assert seq2seq_ids(tok, cfg.replace(decoder_start_token_id=5), {}).start == 5
    assert seq2seq_text(tok, [tok.vocab_size + 9], Seq2SeqIds(0, 1)) == f"<id {tok.vocab_size + 9}>"


def test_t5_without_a_start_id_needs_one(sp_model):
    from megalite.data.tokenizers import build_tokenizer
    tok = build_tokenizer("SentencePieceTokenizer", sp_model)
    with pytest.raises(MegaliteError, match="names no decoder_start_token_id"):
        seq2seq_ids(tok, get_preset("tiny-t5"), {})
    ids = seq2seq_ids(tok, get_preset("tiny-t5").replace(decoder_start_token_id=0), {})
    assert (ids.start, ids.stop) == (0, tok.eod)
