"""Data text never becomes control ids, for every tokenizer type (issue 10).

A literal ``</s>``, ``[SEP]`` or ``<|endoftext|>`` inside a document must encode as its
characters: were it the end-of-document id, one document would become two during pretraining.
The control ids each test forbids are computed here from the tokenizer libraries themselves
(not from megalite's ``control_ids``), so that a wrong list in megalite cannot hide a leak.
Every comparison is exact (token ids, text); there is no tolerance.
"""
from __future__ import annotations

import json

import pytest
import sentencepiece as spm

from megalite.data.indexed import IndexedDataset
from megalite.data.tokenizers import build_tokenizer
from megalite.errors import MegaliteError
from megalite.dataprep import preprocess_data

SPECIALS = ["<s>", "</s>", "<pad>", "<unk>", "[SEP]", "[CLS]", "[PAD]", "[MASK]", "[UNK]",
            "<|endoftext|>"]
# Each special alone, glued to words, at the start, at the end, and all together.
TEXTS = ([f"a {s} b" for s in SPECIALS] + [f"x{s}y" for s in SPECIALS]
         + [f"{SPECIALS[1]} starts", "ends with </s>", "def f():\n    return '<|endoftext|>'",
            " ".join(SPECIALS)])


def assert_no_control_ids(tok, forbidden: set, texts=TEXTS):
    assert forbidden, "nothing to check"
    for text in texts:
        ids = tok.encode(text)
        assert not set(ids) & forbidden, f"{text!r} -> {ids} holds control ids"
    for text, ids in zip(texts, tok.encode_batch(texts)):   # the preprocessing path
        assert ids == tok.encode(text)


# --- SentencePiece ----------------------------------------------------------------------------

def test_sentencepiece_keeps_special_text_as_text(sp_model):
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=sp_model)
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    controls = {i for i in range(sp.get_piece_size()) if sp.is_control(i)}
    assert controls == {1, 2, 3}                      # <s>, </s>, <pad>: what train-tokenizer makes
    assert not any(sp.is_unknown(i) or sp.is_control(i) for i in tok.control_ids - controls)
    # --character-coverage 1.0 on ASCII text: every character here has a piece, so no <unk>.
    assert_no_control_ids(tok, controls | {sp.unk_id()})
    for text in TEXTS:   # lossless on single-spaced text (nmt_nfkc folds newlines and runs)
        if "\n" not in text:
            assert tok.decode(tok.encode(text)) == text
    # decode of training ids is SentencePiece's: control pieces decode to nothing
    ids = tok.encode("a b") + [tok.eod]
    assert tok.decode(ids) == sp.decode(ids) == "a b"


def test_sentencepiece_control_symbols_never_match_user_defined_do(corpus_texts, tmp_path):
    """Extra control symbols are safe; user-defined symbols match text by SentencePiece's
    definition (they are vocabulary; ``megalite train-tokenizer`` makes none)."""
    prefix = str(tmp_path / "extra")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus_texts[:300]), model_prefix=prefix,
                                   vocab_size=400, control_symbols=["[SEP]", "<|endoftext|>"],
                                   user_defined_symbols=["<mask>"], minloglevel=2)
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=prefix + ".model")
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    controls = {i for i in range(sp.get_piece_size()) if sp.is_control(i)}
    assert {sp.piece_to_id("[SEP]"), sp.piece_to_id("<|endoftext|>"), tok.eod} <= controls
    assert_no_control_ids(tok, controls)
    assert sp.piece_to_id("<mask>") in tok.encode("a <mask> b")


def test_sentencepiece_eos_is_always_a_control_piece(sp_model, tmp_path):
    """A (hand-edited) model whose ``</s>`` is USER_DEFINED (matched in text) has no eos for
    SentencePiece, which recognizes only CONTROL pieces as eos: megalite refuses it."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    proto.ParseFromString(open(sp_model, "rb").read())
    proto.pieces[2].type = model_pb2.ModelProto.SentencePiece.USER_DEFINED   # </s>
    bad = tmp_path / "eos_user_defined.model"
    bad.write_bytes(proto.SerializeToString())
    sp = spm.SentencePieceProcessor(model_file=str(bad))
    assert 2 in sp.encode("a </s> b") and sp.eos_id() == -1
    with pytest.raises(MegaliteError, match=rf"--tokenizer-model {bad}: the model has no "
                                            r"end-of-sentence piece"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(bad))


# --- BERT WordPiece ---------------------------------------------------------------------------

@pytest.mark.parametrize("tok_type", ["BertWordPieceLowerCase", "BertWordPieceCase"])
def test_wordpiece_keeps_special_text_as_text(tok_type, wordpiece_vocab):
    tok = build_tokenizer(tok_type, vocab_file=wordpiece_vocab)
    vocab = {t: i for i, t in enumerate(open(wordpiece_vocab, encoding="utf-8").read().split("\n"))}
    forbidden = {vocab[t] for t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]")}
    if tok_type == "BertWordPieceLowerCase":
        forbidden.add(vocab["[UNK]"])   # the vocab is lower-cased: "sep", "cls"... have pieces
    # (cased: "SEP" has no pieces in this lower-cased vocab, so [UNK] is the right answer)
    assert_no_control_ids(tok, forbidden)
    assert tok.control_ids == forbidden - {vocab["[UNK]"]}
    # WordPiece is not lossless: BERT splits punctuation off (and lower-cases).
    if tok_type == "BertWordPieceLowerCase":
        assert tok.decode(tok.encode("x [SEP] y </s>")) == "x [ sep ] y < / s >"
    assert tok.decode([vocab["[CLS]"], *tok.encode("x"), tok.eod]) == "[CLS] x [SEP]"


# --- GPT-2 BPE --------------------------------------------------------------------------------

def test_gpt2_bpe_keeps_special_text_as_text(hf_tokenizer_json, tmp_path):
    from tokenizers import Tokenizer

    vocab, merges = Tokenizer.from_file(hf_tokenizer_json).model.save(str(tmp_path))
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)
    eod = json.load(open(vocab, encoding="utf-8"))["<|endoftext|>"]
    assert tok.eod == eod and tok.control_ids == {eod}
    assert_no_control_ids(tok, {eod})
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text   # byte-level BPE is lossless
    assert tok.decode(tok.encode("end") + [eod]) == "end<|endoftext|>"


# --- tokenizer.json ---------------------------------------------------------------------------

def test_hf_tokenizer_json_keeps_special_text_as_text(hf_tokenizer_json):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(hf_tokenizer_json)
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=hf_tokenizer_json)
    special = {i for i, t in raw.get_added_tokens_decoder().items() if t.special}
    assert special == {tok.eod}
    # The library alone matches the added token in text: the bug this guards against.
    assert tok.eod in raw.encode("a <|endoftext|> b", add_special_tokens=False).ids
    assert_no_control_ids(tok, special)
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("a b") + [tok.eod] + tok.encode("c")   # training ids: decode unaffected
    assert tok.decode(ids) == raw.decode(ids, skip_special_tokens=False) == "a b<|endoftext|>c"


def test_hf_unk_that_doubles_as_eos_stays_a_control(hf_tokenizer_json, tmp_path):
    """GPT-2's tokenizer_config names <|endoftext|> as unk, bos and eos alike."""
    (tmp_path / "tokenizer.json").write_bytes(open(hf_tokenizer_json, "rb").read())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {t: "<|endoftext|>" for t in ("unk_token", "bos_token", "eos_token")}))
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path))
    assert tok.control_ids == {tok.eod}
    assert_no_control_ids(tok, {tok.eod})


def _llama_like(corpus_texts, directory, config: dict | None, eos_special=True):
    """A byte-level BPE tokenizer.json with <unk> <s> </s> <pad> [SEP] [CLS] as added tokens
    (``</s>`` not marked special when ``eos_special`` is False) and a tokenizer_config.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, show_progress=False,
                                  special_tokens=["<unk>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus_texts[:300], trainer=trainer)
    tok.add_tokens([AddedToken("</s>", special=eos_special, normalized=False)])
    tok.add_special_tokens(["<pad>", "[SEP]", "[CLS]"])
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return tok


@pytest.mark.parametrize("eos_special", [True, False])
def test_hf_added_specials_and_configured_tokens(eos_special, corpus_texts, tmp_path):
    """Every special added token, and the configured eos even when it was added as a plain
    token, stays text."""
    config = {"eos_token": "</s>", "bos_token": {"content": "<s>"}, "unk_token": "<unk>",
              "pad_token": "<pad>", "additional_special_tokens": ["[SEP]"]}
    raw = _llama_like(corpus_texts, tmp_path / "t", config, eos_special)
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "t"))
    assert tok.eod == raw.token_to_id("</s>")
    if not eos_special:   # the library would match a plain added token in text
        assert tok.eod in raw.encode("a </s> b", add_special_tokens=False).ids
    forbidden = {raw.token_to_id(t) for t in ("<unk>", "<s>", "</s>", "<pad>", "[SEP]", "[CLS]")}
    assert_no_control_ids(tok, forbidden)   # byte-level: every text is representable, no <unk>
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode([raw.token_to_id("<s>"), *tok.encode("hi"), tok.eod]) == "<s>hi</s>"


def test_hf_tokenizer_that_makes_control_ids_from_text_is_refused(tmp_path):
    """A word-level vocabulary holding "[SEP]" as a word: text would produce the eod."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "[SEP]": 1, "a": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "[SEP]"}))
    with pytest.raises(MegaliteError, match=r"tokenizer.json: the text '\[SEP\]' \(control token "
                                            r"1\) encodes to control id\(s\) \[1\]"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path))


# --- preprocessing, end to end ----------------------------------------------------------------

@pytest.mark.parametrize("tok_type, fixture", [("SentencePieceTokenizer", "sp_model"),
                                               ("HuggingFaceTokenizer", "hf_tokenizer_json")])
def test_preprocess_document_with_special_text_has_one_eod_at_the_end(tok_type, fixture, request,
                                                                      tmp_path):
    path = request.getfixturevalue(fixture)
    docs = ["before </s> after", "<s>x</s><|endoftext|>[SEP]</s>", " ".join(SPECIALS)]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    argv = ["--input", str(src), "--output-prefix", str(tmp_path / "o"), "--tokenizer-type",
            tok_type, "--tokenizer-model", path, "--append-eod", "--workers", "2",
            "--log-interval", "1000000"]
    assert preprocess_data.main(argv) == 0
    tok = build_tokenizer(tok_type, tokenizer_model=path)
    ds = IndexedDataset(str(tmp_path / "o_text_document"))
    assert len(ds) == len(docs)
    for d, text in enumerate(docs):
        ids = ds[d].tolist()
        assert ids.count(tok.eod) == 1 and ids[-1] == tok.eod, f"document {d}: {ids}"
        assert tok.decode(ids[:-1]) == text
