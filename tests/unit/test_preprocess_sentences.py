"""``megalite preprocess --split-sentences``: one sequence per sentence, documents in the .idx.

The reference is megatron-core itself: its ``IndexedDatasetBuilder`` fed, for the same sentences,
what Megatron-LM's ``tools/preprocess_data.py`` feeds it (each sentence tokenized on its own,
sentences of no tokens dropped, the eod appended to a document's last sentence only when the
document has a token), and its ``IndexedDataset`` reading our files. megatron-core is a test
dependency (``pip install --no-deps megatron-core==0.16.1``).

Exactness: every comparison is exact (token ids, sentence strings, file bytes).
"""
from __future__ import annotations

import filecmp
import gzip
import json
import os
import re
import sys
import warnings

import numpy as np
import pytest

from megalite.cli import run_main
from megalite.data.indexed import IndexedDataset
from megalite.data.tokenizers import build_tokenizer
from megalite.dataprep import merge_datasets, preprocess_data
from megalite.dataprep.sentences import (NON_ASCII_SPACES, SentenceSplitter, group_sentences,
                                         language_code, split_values)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.datasets import indexed_dataset as mcore

# Texts the built-in corpus lacks: Chinese, paragraphs, whitespace between and around sentences.
EXTRA_TEXTS = [
    "今天天气很好。我们去公园散步吧！你觉得怎么样？他说：“好的。”然后我们出发了。",
    "\n\nIntroduction\n\nThis chapter explains the basics.  It assumes nothing.\n\n\nThe end.  ",
    "No sentence end at all",
    "Mr. Smith paid $3.50 at 5 p.m. and left. Then B\u00a0. Then C\u3000. Done!",
]


def sp(sp_model):
    return ("SentencePieceTokenizer", "--tokenizer-model", sp_model)


def run(inputs, prefix, tokenizer_args, *extra):
    argv = ["--input", *map(str, inputs), "--output-prefix", str(prefix), "--tokenizer-type",
            *tokenizer_args, "--log-interval", "1000000", *extra]
    assert preprocess_data.main(argv) == 0


def same_files(a, b) -> bool:
    return all(filecmp.cmp(f"{a}.{ext}", f"{b}.{ext}", shallow=False) for ext in ("bin", "idx"))


def write_jsonl(path, texts):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    return path


def megatron_reference(prefix, texts, splitter, tokenizer, append_eod: bool, dtype):
    """What Megatron-LM's preprocess_data.py writes for these sentences, through megatron-core."""
    builder = mcore.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for text in texts:
        doc, lengths = [], []
        for sentence in splitter(text):
            ids = tokenizer.encode(sentence)
            if ids:
                doc += ids
                lengths.append(len(ids))
        if doc and append_eod:
            doc.append(tokenizer.eod)
            lengths[-1] += 1
        builder.add_document(np.asarray(doc, dtype=dtype), lengths)
    builder.finalize(prefix + ".idx")


@pytest.fixture(scope="module")
def mixed_jsonl(corpus_texts, tmp_path_factory):
    texts = corpus_texts[:500] + EXTRA_TEXTS
    return write_jsonl(tmp_path_factory.mktemp("mixed") / "mixed.jsonl", texts), texts


# -- the splitter ----------------------------------------------------------------------------------


def test_sentences_of_english_and_chinese():
    split = SentenceSplitter()
    assert split("Dr. Smith went to Washington. He paid $3.50 for coffee!  Then he left.\n\n"
                 "A new paragraph starts here.") == [
        "Dr. Smith went to Washington.", "He paid $3.50 for coffee!", "Then he left.",
        "A new paragraph starts here."]
    assert split(EXTRA_TEXTS[0]) == ["今天天气很好。", "我们去公园散步吧！", "你觉得怎么样？",
                                     "他说：“好的。”", "然后我们出发了。"]
    assert split(EXTRA_TEXTS[2]) == [EXTRA_TEXTS[2]]
    assert split(" \n\t ") == []


def test_keep_newlines_keeps_the_whitespace_after_each_sentence(corpus_texts):
    plain, keep = SentenceSplitter(), SentenceSplitter(keep_newlines=True)
    assert keep(EXTRA_TEXTS[1]) == ["\n\nIntroduction\n\n", "This chapter explains the basics.  ",
                                    "It assumes nothing.\n\n\n", "The end."]
    assert plain(EXTRA_TEXTS[1]) == ["Introduction", "This chapter explains the basics.",
                                     "It assumes nothing.", "The end."]
    split_some = 0
    for text in corpus_texts + EXTRA_TEXTS:
        kept, stripped = keep(text), plain(text)
        assert "".join(kept) == text.rstrip()  # nothing lost, nothing added
        assert stripped == [s.strip() for s in kept] and all(stripped)
        assert all(not s[:1].isspace() for s in kept[1:])  # whitespace goes with the sentence before
        split_some += len(kept) > 1
    assert split_some > len(corpus_texts) // 2  # the corpus really is split


def test_non_ascii_whitespace_before_a_period_does_not_crash_the_splitter():
    """sentencex 1.0.32 panics on a capital, one non-ASCII whitespace character and a period;
    the splitter looks for boundaries in a copy with such whitespace made a space."""
    import sentencex

    with pytest.raises(BaseException) as info:  # the bug the workaround exists for
        list(sentencex.segment("en", "B\u3000."))
    assert type(info.value).__name__ == "PanicException"
    # The same failure, met by split_values, is a bad line (FILE:LINE in preprocess), no crash.
    values, bad = split_values(lambda t: list(sentencex.segment("en", t)), ["text"], ["B\u00a0."])
    assert values is None and bad[0] == "sentence splitter failed" and "'text'" in bad[1]
    keep = SentenceSplitter(keep_newlines=True)
    spaces = [chr(c) for c in range(0x80, 0x110000) if chr(c).isspace()]
    assert re.fullmatch(f"[{NON_ASCII_SPACES}]+", "".join(spaces)) and len(spaces) == 19
    for c in spaces:
        text = f"Mr A{c}. Then B{c}.{c}Next one."
        assert "".join(keep(text)) == text


def test_language_names():
    assert language_code(None) == "en" and language_code("english") == "en"
    assert language_code("German") == "de" and language_code("zh") == "zh"
    german = SentenceSplitter(lang="de")
    assert german("Das ist z.B. gut. Hallo Welt.") == ["Das ist z.B. gut.", "Hallo Welt."]


def test_grouping_follows_megatron():
    ids = [[1, 2], [], [3], [], [], [4]]  # doc 0: 3 sentences (one empty), doc 1: 2 empty, doc 2: 1
    tokens, lengths, per_doc = group_sentences(ids, [3, 2, 1], eod=9)
    assert tokens == [1, 2, 3, 9, 4, 9]
    assert lengths.tolist() == [2, 2, 2] and per_doc.tolist() == [2, 0, 1]
    tokens, lengths, per_doc = group_sentences(ids, [3, 2, 1], eod=None)
    assert tokens == [1, 2, 3, 4] and lengths.tolist() == [2, 1, 1]


# -- preprocess end to end -------------------------------------------------------------------------


def test_megatron_reads_the_output_and_writes_the_same_bytes(mixed_jsonl, sp_model, tmp_path):
    path, texts = mixed_jsonl
    common = (sp(sp_model), "--split-sentences", "--append-eod", "--chunk-bytes", "20000")
    run([path], tmp_path / "w1", *common, "--workers", "1")
    run([path], tmp_path / "w2", *common, "--workers", "2")
    ours = str(tmp_path / "w1_text_sentence")
    assert not os.path.exists(tmp_path / "w1_text_document.idx")
    assert same_files(ours, tmp_path / "w2_text_sentence")  # any --workers, same bytes

    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=sp_model)
    split = SentenceSplitter()
    megatron_reference(str(tmp_path / "ref"), texts, split, tok, True, np.uint16)
    assert same_files(ours, tmp_path / "ref")

    theirs = mcore.IndexedDataset(ours, mmap=True)
    mine = IndexedDataset(ours)
    assert mine.num_documents == len(texts) and len(mine) > 2 * len(texts)
    np.testing.assert_array_equal(theirs.document_indices, mine.document_indices)
    for d in list(range(0, 500, 37)) + list(range(500, len(texts))):
        expected = [tok.encode(s) for s in split(texts[d])]
        expected[-1].append(tok.eod)
        got = [mine[i].tolist() for i in mine.document_sequences(d)]
        assert got == expected, f"document {d}"
        assert [theirs[i].tolist() for i in mine.document_sequences(d)] == expected


def test_empty_sentences_and_documents_as_megatron(wordpiece_vocab, tmp_path):
    """BERT's normalizer deletes control characters: a sentence (or a whole document) of them
    has no tokens. Megatron drops such sentences, and keeps such a document with no sentence and
    no eod."""
    texts = ["Hello there.\n\n\x01\x02\n\nGood bye.", "\x01\x02\x03", "Last one. Really."]
    src = write_jsonl(tmp_path / "in.jsonl", texts)
    wp = ("BertWordPieceLowerCase", "--vocab-file", wordpiece_vocab)
    run([src], tmp_path / "o", wp, "--split-sentences", "--append-eod")
    ds = IndexedDataset(str(tmp_path / "o_text_sentence"))
    assert ds.document_indices.tolist() == [0, 2, 2, 4]
    tok = build_tokenizer("BertWordPieceLowerCase", vocab_file=wordpiece_vocab)
    assert ds[1].tolist() == tok.encode("Good bye.") + [tok.eod] and len(ds.document(1)) == 0
    megatron_reference(str(tmp_path / "ref"), texts, SentenceSplitter(), tok, True, np.uint16)
    assert same_files(tmp_path / "o_text_sentence", tmp_path / "ref")


def test_shards_merge_to_the_unsharded_output(mixed_jsonl, sp_model, tmp_path):
    path, _ = mixed_jsonl
    with open(path, "rb") as f:
        lines = f.readlines()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(b"".join(lines[:300]))
    with gzip.open(tmp_path / "in" / "b.jsonl.gz", "wb") as f:
        f.write(b"".join(lines[300:]))
    common = (sp(sp_model), "--split-sentences", "--append-eod")
    run([tmp_path / "in"], tmp_path / "full", *common)
    for i in range(3):
        run([tmp_path / "in"], tmp_path / "s" / "p", *common, "--num-shards", "3", "--shard-index", str(i))
    assert sorted(os.listdir(tmp_path / "s"))[0] == "p_shard00000-of-00003_text_sentence.bin"
    assert merge_datasets.main(["--input", str(tmp_path / "s"), "--output-prefix", str(tmp_path / "m")]) == 0
    assert same_files(tmp_path / "full_text_sentence", tmp_path / "m")


def test_keep_newlines_reach_a_byte_level_tokenizer(hf_tokenizer_json, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", EXTRA_TEXTS)
    run([src], tmp_path / "o", ("HuggingFaceTokenizer", "--tokenizer-model", hf_tokenizer_json),
        "--split-sentences", "--keep-newlines", "--workers", "2")
    ds = IndexedDataset(str(tmp_path / "o_text_sentence"))
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=hf_tokenizer_json)
    keep = SentenceSplitter(keep_newlines=True)
    for d, text in enumerate(EXTRA_TEXTS):
        assert [ds[i].tolist() for i in ds.document_sequences(d)] == [tok.encode(s) for s in keep(text)]
        assert tok.decode(ds.document(d).tolist()) == text.rstrip()  # byte-level BPE round-trips


@pytest.mark.parametrize("argv, words", [
    (["--keep-newlines"], "--keep-newlines only applies to sentence splitting: add --split-sentences"),
    (["--lang", "de"], "--lang only applies to sentence splitting"),
    (["--split-sentences", "--lang", "Klingon!"], "--lang Klingon!: not a language code"),
    (["--split-sentences", "--keep-newlines"],
     "--keep-newlines: the SentencePieceTokenizer tokenizer drops newlines"),
])
def test_flags_it_cannot_work_with_are_one_line_errors(argv, words, sp_model, tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", ["One. Two."])
    rc = run_main(preprocess_data.main, ["--input", str(src), "--output-prefix", str(tmp_path / "o" / "x"),
                                         "--tokenizer-type", *sp(sp_model), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and words in err and err.count("\n") == 1, err
    assert not os.path.exists(tmp_path / "o")


def test_missing_splitter_package_names_flag_and_package(sp_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentencex", None)  # makes `import sentencex` fail
    src = write_jsonl(tmp_path / "in.jsonl", ["One. Two."])
    rc = run_main(preprocess_data.main, ["--input", str(src), "--output-prefix", str(tmp_path / "x"),
                                         "--tokenizer-type", *sp(sp_model), "--split-sentences"])
    err = capsys.readouterr().err
    assert rc == 2 and "--split-sentences needs the Python package sentencex" in err
    assert "pip install sentencex==" in err and "Traceback" not in err


def test_help_explains_the_flags():
    text = preprocess_data.build_parser().format_help()
    for words in ("--split-sentences", "_sentence", "--keep-newlines", "--lang"):
        assert words in text
