"""``megalite preprocess`` on real text: token ids, dtype, worker-count and shard invariance.

Exactness: every comparison here is exact (token ids, file bytes); there is no tolerance to state.
"""
from __future__ import annotations

import filecmp
import gzip
import os

import numpy as np
import pytest

from megalite.data.indexed import IndexedDataset
from megalite.data.tokenizers import build_tokenizer
from megalite.dataprep import merge_datasets, preprocess_data

TOKENIZERS = {
    # name -> (tokenizer type, fixture holding the file, flag for the file)
    "sentencepiece": ("SentencePieceTokenizer", "sp_model", "--tokenizer-model"),
    "wordpiece": ("BertWordPieceLowerCase", "wordpiece_vocab", "--vocab-file"),
    "hf-json": ("HuggingFaceTokenizer", "hf_tokenizer_json", "--tokenizer-model"),
}


def run_preprocess(inputs, prefix, tok_type, flag, path, *extra):
    argv = ["--input", *inputs, "--output-prefix", str(prefix), "--tokenizer-type", tok_type,
            flag, path, "--log-interval", "1000000", *extra]
    assert preprocess_data.main(argv) == 0


def same_files(prefix_a, prefix_b) -> bool:
    return all(filecmp.cmp(f"{prefix_a}.{ext}", f"{prefix_b}.{ext}", shallow=False)
               for ext in ("bin", "idx"))


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_documents_equal_tokenizer_encode_plus_eod(name, request, corpus_jsonl, corpus_texts, tmp_path):
    tok_type, fixture, flag = TOKENIZERS[name]
    path = request.getfixturevalue(fixture)
    run_preprocess([corpus_jsonl], tmp_path / "out", tok_type, flag, path, "--append-eod")
    tokenizer = build_tokenizer(tok_type, **{flag[2:].replace("-", "_"): path})
    texts = corpus_texts
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    assert ds.dtype == np.uint16  # vocab 1000/2000 < 65,500
    assert ds.num_documents == len(texts) == len(ds)  # one sequence per document
    expected = tokenizer.encode_batch(texts)
    for d, ids in enumerate(expected):
        assert ds[d].tolist() == ids + [tokenizer.eod], f"document {d} differs"
    assert ds.num_tokens == sum(len(ids) + 1 for ids in expected)


def test_without_append_eod_and_two_keys(sp_model, tmp_path):
    src = tmp_path / "two_keys.jsonl"
    src.write_text('{"title": "First title", "text": "Body one."}\n'
                   '{"title": "Second", "text": "Body two, longer than the first."}\n')
    run_preprocess([str(src)], tmp_path / "o", "SentencePieceTokenizer", "--tokenizer-model",
                   sp_model, "--json-keys", "text", "title")
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=sp_model)
    for key, texts in (("text", ["Body one.", "Body two, longer than the first."]),
                       ("title", ["First title", "Second"])):
        ds = IndexedDataset(str(tmp_path / f"o_{key}_document"))
        assert [ds[i].tolist() for i in range(len(ds))] == [tok.encode(t) for t in texts]


@pytest.mark.parametrize("workers", [2, 3])
def test_output_bytes_do_not_depend_on_workers(workers, corpus_jsonl, sp_model, tmp_path):
    # Small chunks so that several chunks are in flight and finish out of order.
    common = ("SentencePieceTokenizer", "--tokenizer-model", sp_model, "--append-eod",
              "--chunk-bytes", "65536")
    run_preprocess([corpus_jsonl], tmp_path / "w1", *common, "--workers", "1")
    run_preprocess([corpus_jsonl], tmp_path / f"w{workers}", *common, "--workers", str(workers))
    assert same_files(tmp_path / "w1_text_document", tmp_path / f"w{workers}_text_document")


@pytest.fixture(scope="module")
def two_inputs(corpus_jsonl, tmp_path_factory):
    """The corpus split in two files, the second gzipped, plus a blank line to ignore."""
    d = tmp_path_factory.mktemp("two_inputs")
    with open(corpus_jsonl, "rb") as f:
        lines = f.readlines()
    half = len(lines) * 2 // 3
    (d / "a.jsonl").write_bytes(b"".join(lines[:half]) + b"\n")
    with gzip.open(d / "b.jsonl.gz", "wb") as f:
        f.write(b"".join(lines[half:]))
    return [str(d / "a.jsonl"), str(d / "b.jsonl.gz")]


def test_shards_merged_equal_unsharded(two_inputs, sp_model, tmp_path):
    common = ("SentencePieceTokenizer", "--tokenizer-model", sp_model, "--append-eod")
    run_preprocess(two_inputs, tmp_path / "full", *common)
    shard_dir = tmp_path / "shards"
    for i in range(3):
        run_preprocess([os.path.dirname(two_inputs[0])], shard_dir / "part", *common,
                       "--num-shards", "3", "--shard-index", str(i))
    names = sorted(os.listdir(shard_dir))
    assert names == [f"part_shard{i:05d}-of-00003_text_document.{e}" for i in range(3) for e in ("bin", "idx")]
    sizes = [IndexedDataset(str(shard_dir / f"part_shard{i:05d}-of-00003_text_document")).num_documents
             for i in range(3)]
    assert all(n > 0 for n in sizes)  # each shard got work: the split is real
    assert merge_datasets.main(["--input", str(shard_dir), "--output-prefix", str(tmp_path / "merged")]) == 0
    assert same_files(tmp_path / "full_text_document", tmp_path / "merged")
    # Explicit prefixes in shard order give the same, and a wrong order does not.
    prefixes = [str(shard_dir / f"part_shard{i:05d}-of-00003_text_document") for i in (0, 1, 2)]
    assert merge_datasets.main(["--input", *prefixes, "--output-prefix", str(tmp_path / "m2")]) == 0
    assert same_files(tmp_path / "full_text_document", tmp_path / "m2")
    assert merge_datasets.main(["--input", *prefixes[::-1], "--output-prefix", str(tmp_path / "m3")]) == 0
    assert not same_files(tmp_path / "full_text_document", tmp_path / "m3")


def test_more_shards_than_lines_gives_empty_shards_that_merge(sp_model, tmp_path):
    src = tmp_path / "tiny.jsonl"
    src.write_text('{"text": "only one line"}\n')
    common = ("SentencePieceTokenizer", "--tokenizer-model", sp_model)
    run_preprocess([str(src)], tmp_path / "full", *common)
    for i in range(4):
        run_preprocess([str(src)], tmp_path / "s" / "p", *common, "--num-shards", "4", "--shard-index", str(i))
    counts = [IndexedDataset(str(tmp_path / "s" / f"p_shard{i:05d}-of-00004_text_document")).num_documents
              for i in range(4)]
    assert sorted(counts) == [0, 0, 0, 1]
    assert merge_datasets.main(["--input", str(tmp_path / "s"), "--output-prefix", str(tmp_path / "m")]) == 0
    assert same_files(tmp_path / "full_text_document", tmp_path / "m")


def test_large_vocab_writes_int32(tmp_path):
    """A tokenizer with >= 65,500 entries gets int32 token files."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70000)}
    vocab["[UNK]"] = len(vocab)
    vocab["</s>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "w1 w69999 w65535 nope"}\n')
    run_preprocess([str(src)], tmp_path / "o", "HuggingFaceTokenizer", "--tokenizer-model",
                   str(tmp_path), "--append-eod")  # a directory holding tokenizer.json
    ds = IndexedDataset(str(tmp_path / "o_text_document"))
    assert ds.dtype == np.int32
    assert ds[0].tolist() == [1, 69999, 65535, 70000, 70001]


def test_shared_token_dataset_fixture(corpus_token_dataset, corpus_texts, sp_model):
    """The session fixture other tests train on: one document per corpus text, each ending in eod."""
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=sp_model)
    ds = IndexedDataset(corpus_token_dataset)
    assert ds.num_documents == len(corpus_texts)
    assert ds[0].tolist() == tok.encode(corpus_texts[0]) + [tok.eod]
    # Every document ends in eod, and eod appears nowhere else (the text never encodes to </s>).
    tokens = np.fromfile(corpus_token_dataset + ".bin", dtype=np.uint16)
    ends = (ds.sequence_pointers // 2 + ds.sequence_lengths - 1).astype(np.int64)
    assert (tokens[ends] == tok.eod).all()
    assert int((tokens == tok.eod).sum()) == ds.num_documents


def test_merging_a_directory_of_several_keys_needs_a_glob(sp_model, tmp_path, capsys):
    src = tmp_path / "two_keys.jsonl"
    src.write_text("".join(f'{{"title": "Title {i}", "text": "Body number {i}."}}\n' for i in range(20)))
    common = ("SentencePieceTokenizer", "--tokenizer-model", sp_model, "--json-keys", "text", "title")
    run_preprocess([str(src)], tmp_path / "full", *common)
    for i in range(2):
        run_preprocess([str(src)], tmp_path / "s" / "p", *common, "--num-shards", "2", "--shard-index", str(i))
    from megalite.cli import run_main

    rc = run_main(merge_datasets.main, ["--input", str(tmp_path / "s"), "--output-prefix", str(tmp_path / "m")])
    assert rc == 2 and "datasets of several kinds" in capsys.readouterr().err
    for key in ("text", "title"):
        out = str(tmp_path / f"m_{key}")
        assert merge_datasets.main(["--input", str(tmp_path / "s" / f"*_{key}_document"), "--output-prefix", out]) == 0
        assert same_files(tmp_path / f"full_{key}_document", out)


def test_gpt2_bpe_files_and_old_megatron_flags(hf_tokenizer_json, tmp_path):
    from tokenizers import Tokenizer

    vocab, merges = Tokenizer.from_file(hf_tokenizer_json).model.save(str(tmp_path))
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "Hello, world."}\n{"text": "def f(x): return x"}\n')
    run_preprocess([str(src)], tmp_path / "o", "GPT2BPETokenizer", "--vocab-file", vocab,
                   "--merge-file", merges, "--append-eod", "--dataset-impl", "mmap")
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)
    ds = IndexedDataset(str(tmp_path / "o_text_document"))
    assert [ds[i].tolist() for i in range(len(ds))] == [tok.encode(t) + [tok.eod] for t in
                                                        ("Hello, world.", "def f(x): return x")]
