"""Tokenizers (`build_tokenizer`) and `megalite train-tokenizer`, on locally made text."""
from __future__ import annotations

import json
import os
import random

import pytest
import sentencepiece as spm

from megalite.cli import run_main
from megalite.data.tokenizers import build_tokenizer
from megalite.errors import MegaliteError
from megalite.dataprep import train_tokenizer

SAMPLE = "The quick brown fox jumps over the lazy dog; it returns None."


# --- SentencePiece ----------------------------------------------------------------------------

def test_sentencepiece_matches_the_library_and_has_standard_specials(sp_model, corpus_texts):
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=sp_model)
    ref = spm.SentencePieceProcessor(model_file=sp_model)
    assert tok.vocab_size == ref.get_piece_size() == 1000
    assert [ref.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert tok.eod == ref.eos_id() == 2
    texts = corpus_texts[:200]
    assert tok.encode_batch(texts) == [ref.encode(t) for t in texts] == [tok.encode(t) for t in texts]
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE
    # Trained with --character-coverage 1.0 (English): every character of the corpus has a piece.
    assert all(ref.unk_id() not in ids for ids in tok.encode_batch(corpus_texts))


def test_sentencepiece_model_without_eos_is_rejected(corpus_jsonl, corpus_texts, tmp_path):
    prefix = str(tmp_path / "noeos")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus_texts[:300]), model_prefix=prefix,
                                   vocab_size=300, eos_id=-1, minloglevel=2)
    with pytest.raises(MegaliteError, match="no end-of-sentence piece"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=prefix + ".model")


# --- BERT WordPiece ---------------------------------------------------------------------------

def test_wordpiece_lower_and_cased(wordpiece_vocab, corpus_texts):
    from transformers import BertTokenizer

    with open(wordpiece_vocab, encoding="utf-8") as f:
        vocab = [line.rstrip("\n") for line in f]
    lower = build_tokenizer("BertWordPieceLowerCase", vocab_file=wordpiece_vocab)
    cased = build_tokenizer("BertWordPieceCase", vocab_file=wordpiece_vocab)
    assert lower.vocab_size == cased.vocab_size == len(vocab)
    assert lower.eod == cased.eod == vocab.index("[SEP]")
    ids = lower.encode(SAMPLE)
    assert ids == lower.encode(SAMPLE.upper())  # lower-cased
    assert vocab.index("[CLS]") not in ids and lower.eod not in ids  # no specials added
    # WordPiece decoding joins "##" pieces and re-attaches "," and "." (BERT's clean-up).
    assert lower.decode(lower.encode("The Quick brown fox, it returns None.")) == "the quick brown fox, it returns none."
    assert cased.encode("Fox") != cased.encode("fox")
    assert lower.encode("Résumé café") == lower.encode("resume cafe")  # accents stripped
    # CJK characters are split one by one before WordPiece (BERT's rule); unseen ones are [UNK].
    assert lower.encode("猫狗") == [vocab.index("[UNK]")] * 2
    # Same ids as transformers' BERT tokenizer built from the same vocab.
    for do_lower, tok in ((True, lower), (False, cased)):
        ref = BertTokenizer(vocab=wordpiece_vocab, do_lower_case=do_lower)
        for text in corpus_texts[:50]:
            assert tok.encode(text) == ref.encode(text, add_special_tokens=False)


# --- tokenizer.json ---------------------------------------------------------------------------

def test_hf_tokenizer_json_file_and_directory(hf_tokenizer_json, corpus_texts, tmp_path):
    from transformers import PreTrainedTokenizerFast

    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=hf_tokenizer_json)
    ref = PreTrainedTokenizerFast(tokenizer_file=hf_tokenizer_json)
    assert tok.vocab_size == len(ref) == 2000
    assert tok.eod == ref.convert_tokens_to_ids("<|endoftext|>")
    for text in corpus_texts[:100]:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text  # byte-level BPE is lossless
    assert tok.encode_batch(corpus_texts[:20]) == [tok.encode(t) for t in corpus_texts[:20]]
    # A directory works too, and its tokenizer_config.json's eos_token wins.
    d = tmp_path / "tok"
    d.mkdir()
    (d / "tokenizer.json").write_bytes(open(hf_tokenizer_json, "rb").read())
    assert build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(d)).eod == tok.eod
    from tokenizers import AddedToken, Tokenizer

    hf = Tokenizer.from_file(hf_tokenizer_json)
    hf.add_tokens([AddedToken("<|doc_end|>", normalized=False)])  # added, but not special
    hf.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|doc_end|>"}}))
    configured = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(d))
    assert configured.eod == hf.token_to_id("<|doc_end|>") == 2000
    assert configured.eod not in configured.encode("a <|doc_end|> b")  # the eod is never text
    # An eos that ordinary text encodes to would end documents mid-text: refused.
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "the"}}))
    with pytest.raises(MegaliteError, match=r"tokenizer.json: the text 'the' \(control token "
                                            r"\d+\) encodes to control id"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(d))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|not-there|>"}))
    with pytest.raises(MegaliteError, match=r"no end-of-document token; looked for <\|not-there\|>"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(d))


def test_gpt2_bpe_from_vocab_and_merges(hf_tokenizer_json, corpus_texts, tmp_path):
    """vocab.json + merges.txt (Megatron's GPT2BPETokenizer files) of the byte-level BPE fixture
    give the same ids as its tokenizer.json."""
    from tokenizers import Tokenizer

    vocab, merges = Tokenizer.from_file(hf_tokenizer_json).model.save(str(tmp_path))
    gpt2 = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)
    ref = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=hf_tokenizer_json)
    assert (gpt2.vocab_size, gpt2.eod) == (ref.vocab_size, ref.eod)
    assert gpt2.encode_batch(corpus_texts[:100]) == ref.encode_batch(corpus_texts[:100])
    assert gpt2.decode(gpt2.encode(SAMPLE)) == SAMPLE
    with pytest.raises(MegaliteError, match="GPT2BPETokenizer needs --merge-file"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=vocab)
    with pytest.raises(MegaliteError, match="--merge-file is only used by --tokenizer-type GPT2BPETokenizer"):
        build_tokenizer("BertWordPieceCase", vocab_file=vocab, merge_file=merges)


def test_hf_tokenizer_without_any_eos_is_rejected(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "t.json"))
    with pytest.raises(MegaliteError, match="no end-of-document token"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "t.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(MegaliteError, match="not a tokenizers JSON file"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "bad.json"))


@pytest.mark.parametrize("kwargs, match", [
    (dict(tokenizer_type="Nope"), "--tokenizer-type 'Nope' is not supported; choose one of"),
    (dict(tokenizer_type="SentencePieceTokenizer"), "SentencePieceTokenizer needs --tokenizer-model"),
    (dict(tokenizer_type="SentencePieceTokenizer", tokenizer_model="/no/such.model"),
     "--tokenizer-model /no/such.model: no such file"),
    (dict(tokenizer_type="BertWordPieceLowerCase", vocab_file="/no/vocab.txt"),
     "--vocab-file /no/vocab.txt: no such file"),
    (dict(tokenizer_type="BertWordPieceCase", tokenizer_model="x.model"),
     "--tokenizer-model is not used by --tokenizer-type BertWordPieceCase"),
    (dict(tokenizer_type="HuggingFaceTokenizer", vocab_file="vocab.txt"),
     "--vocab-file is not used by --tokenizer-type HuggingFaceTokenizer"),
])
def test_build_tokenizer_errors_name_the_flag(kwargs, match):
    with pytest.raises(MegaliteError, match=match):
        build_tokenizer(**kwargs)


def test_wordpiece_vocab_without_sep_is_rejected(tmp_path):
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n")
    with pytest.raises(MegaliteError, match=r"no \[SEP\] token"):
        build_tokenizer("BertWordPieceCase", vocab_file=str(tmp_path / "vocab.txt"))


# --- train-tokenizer --------------------------------------------------------------------------

def _train(argv, capsys):
    rc = run_main(train_tokenizer.main, [str(a) for a in argv])
    return rc, capsys.readouterr().err


def test_train_tokenizer_is_deterministic_and_atomic(corpus_jsonl, tmp_path, capsys, monkeypatch):
    # Sampling 4000 of the ~40k lines (seeded) keeps unigram training short and tests the seed.
    args = ["--input", corpus_jsonl, "--vocab-size", 500, "--model-type", "unigram",
            "--input-sentence-size", 4000, "--num-threads", 1, "--output-prefix", "tok"]
    for run, seed in (("a", 7), ("b", 7), ("c", 8)):
        (tmp_path / run).mkdir()
        monkeypatch.chdir(tmp_path / run)  # the same relative prefix: the model records it
        rc, err = _train([*args, "--seed", seed], capsys)
        assert rc == 0, err
        assert sorted(os.listdir(".")) == ["tok.model", "tok.vocab"]  # no temporaries left
    read = lambda path: open(tmp_path / path, "rb").read()  # noqa: E731
    assert read("a/tok.model") == read("b/tok.model") and read("a/tok.vocab") == read("b/tok.vocab")
    assert read("a/tok.vocab") != read("c/tok.vocab")  # another seed samples other lines
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "a/tok.model"))
    assert sp.get_piece_size() == 500 and sp.eos_id() == 2


def test_train_tokenizer_errors(corpus_jsonl, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "broken"\n')
    rc, err = _train(["--input", bad, "--output-prefix", tmp_path / "m"], capsys)
    assert rc == 2 and f"{bad}:2: malformed JSON" in err, err
    rc, err = _train(["--input", tmp_path / "none*.jsonl", "--output-prefix", tmp_path / "m"], capsys)
    assert rc == 2 and "--input" in err
    small = tmp_path / "small.jsonl"
    small.write_text('{"text": "tiny corpus"}\n')
    rc, err = _train(["--input", small, "--output-prefix", tmp_path / "m", "--vocab-size", 5000], capsys)
    assert rc == 2 and "--vocab-size" in err and "Traceback" not in err, err
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "small.jsonl"]  # nothing partial left


def _chinese_corpus(path, seed: int, documents: int) -> random.Random:
    """Pseudo-Chinese: 1-3 character words from 600 CJK ideographs, Zipf-distributed, with
    Chinese punctuation and no spaces (what makes it hard for a space-splitting tokenizer)."""
    rng = random.Random(seed)
    chars = [chr(c) for c in rng.sample(range(0x4E00, 0x9FA6), 600)]
    words = ["".join(rng.choice(chars) for _ in range(rng.randint(1, 3))) for _ in range(1500)]
    weights = [1 / (i + 1) for i in range(len(words))]
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(documents):
            sentences = ["".join(rng.choices(words, weights, k=rng.randint(4, 15))) + rng.choice("。！？")
                         for _ in range(rng.randint(2, 6))]
            f.write(json.dumps({"text": "，".join(sentences)}, ensure_ascii=False) + "\n")
    return rng, words, weights


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_train_tokenizer_on_chinese(model_type, tmp_path, capsys):
    src = tmp_path / "zh.jsonl"
    rng, words, weights = _chinese_corpus(src, seed=0, documents=400)
    rc, err = _train(["--input", src, "--output-prefix", tmp_path / "zh", "--vocab-size", 1500,
                      "--model-type", model_type, "--byte-fallback"], capsys)
    assert rc == 0, err
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "zh.model"))
    pieces = [sp.id_to_piece(i).replace("\u2581", "") for i in range(sp.get_piece_size())]
    cjk = [p for p in pieces if p and all("\u4e00" <= c <= "\u9fff" for c in p)]
    assert len(cjk) > 1000 and sum(len(p) > 1 for p in cjk) > 300  # characters and whole words
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(tmp_path / "zh.model"))
    text = "".join(rng.choices(words, weights, k=300))  # unseen text from the same distribution
    ids = tok.encode(text)
    assert sp.unk_id() not in ids
    assert len(ids) < len(text)  # multi-character pieces are used
    assert tok.decode(ids) == text
    # A character absent from training falls back to its UTF-8 bytes, not <unk>.
    rare = "\u9fa5"
    assert [sp.id_to_piece(i) for i in tok.encode(rare) if i != sp.piece_to_id("\u2581")] == \
        ["<0xE9>", "<0xBE>", "<0xA5>"]
    assert tok.decode(tok.encode(rare)) == rare
