"""Bad input to ``megalite preprocess``: ``FILE:LINE: reason``, exit 2, nothing left behind;
with ``--skip-bad-lines``: counted per reason, and only the good documents are written."""
from __future__ import annotations

import gzip
import os

import pytest

from megalite.cli import run_main
from megalite.data.indexed import IndexedDataset
from megalite.data.tokenizers import build_tokenizer
from megalite.dataprep import preprocess_data
from megalite.dataprep.jsonl_input import parse_line

GOOD = [b'{"text": "The first good document."}', b'{"text": "A second, good one."}']
BAD = {  # case -> (line, words the message must contain, summary reason)
    "json": (b'{"text": "no closing brace"', "malformed JSON", "malformed JSON"),
    "utf8": (b'{"text": "caf\xe9 latin-1, not UTF-8"}', "invalid UTF-8", "invalid UTF-8"),
    "missing": (b'{"body": "wrong key"}', "missing key 'text'", "missing key"),
    "number": (b'{"text": 42}', "not a string", "not a string"),
    "null": (b'{"text": null}', "not a string", "not a string"),
    "empty": (b'{"text": " \\n\\t "}', "empty", "empty document"),
    "array": (b'["text", "x"]', "expected a JSON object", "not a JSON object"),
    "surrogate": (b'{"text": "half an emoji \\ud83d"}', "lone surrogate (\\ud83d)", "invalid Unicode escape"),
}


def run(argv, capsys):
    rc = run_main(preprocess_data.main, [str(a) for a in argv])
    return rc, capsys.readouterr().err


def tok_args(sp_model):
    return ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model,
            "--log-interval", "1000000"]


@pytest.mark.parametrize("case", list(BAD))
def test_bad_line_names_file_and_line_and_leaves_nothing(case, sp_model, tmp_path, capsys):
    line, words, _ = BAD[case]
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\n".join(GOOD + [line] + GOOD) + b"\n")
    out = tmp_path / "out"
    out.mkdir()
    rc, err = run(["--input", src, "--output-prefix", out / "ds", *tok_args(sp_model)], capsys)
    assert rc == 2
    assert f"{src}:3: " in err and words in err, err
    assert "Traceback" not in err
    assert os.listdir(out) == []  # no partial .bin/.idx, no temporaries


def test_line_numbers_are_right_in_gzip_and_in_later_shards(sp_model, tmp_path, capsys):
    good = b'{"text": "' + b"filler words " * 20 + b'"}'
    plain = tmp_path / "a.jsonl"
    plain.write_bytes(b"\n".join([good] * 50 + [BAD["json"][0]] + [good] * 5) + b"\n")
    rc, err = run(["--input", plain, "--output-prefix", tmp_path / "s", *tok_args(sp_model),
                   "--num-shards", "4", "--shard-index", "3"], capsys)
    assert rc == 2 and f"{plain}:51: malformed JSON" in err, err
    gz = tmp_path / "b.jsonl.gz"
    with gzip.open(gz, "wb") as f:
        f.write(b"\n".join([good] * 7 + [BAD["missing"][0]]) + b"\n")
    rc, err = run(["--input", gz, "--output-prefix", tmp_path / "g", *tok_args(sp_model)], capsys)
    assert rc == 2 and f"{gz}:8: missing key 'text'" in err, err
    assert not [n for n in os.listdir(tmp_path) if ".bin" in n or ".idx" in n]


def test_skip_bad_lines_counts_each_reason_and_keeps_good_docs(sp_model, tmp_path, capsys):
    lines, good_texts = [], []
    for i, (line, _, _) in enumerate(BAD.values()):
        lines += [f'{{"text": "good document number {i}"}}'.encode(), line]
        good_texts.append(f"good document number {i}")
    lines.insert(3, b"   ")  # blank lines are ignored, not errors
    src = tmp_path / "mixed.jsonl"
    src.write_bytes(b"\n".join(lines))  # no newline at the end of the file either
    rc, err = run(["--input", src, "--output-prefix", tmp_path / "o", *tok_args(sp_model),
                   "--skip-bad-lines", "--append-eod", "--workers", "2", "--chunk-bytes", "64"], capsys)
    assert rc == 0, err
    assert ("skipped lines: 8 (1 empty document, 1 invalid UTF-8, 1 invalid Unicode escape, "
            "1 malformed JSON, 1 missing key, 1 not a JSON object, 2 not a string); blank lines: 1") in err, err
    assert f"skipped {src}:2: malformed JSON" in err
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=sp_model)
    ds = IndexedDataset(str(tmp_path / "o_text_document"))
    assert [ds[i].tolist() for i in range(len(ds))] == [tok.encode(t) + [tok.eod] for t in good_texts]


def test_validity_is_the_json_module_s_even_with_orjson_installed():
    """orjson (a fast path when installed) rejects NaN and lone surrogates; json decides."""
    assert parse_line(b'{"text": "a", "score": NaN}', ["text"]) == (["a"], None)
    assert parse_line(b'{"text": "b", "n": 123456789012345678901234567890}', ["text"]) == (["b"], None)
    assert parse_line(b'{"text": "\\ud83d\\ude00 ok"}', ["text"]) == (["\U0001F600 ok"], None)
    assert parse_line(b'{"text": "\\ud83d"}', ["text"])[1][0] == "invalid Unicode escape"
    assert parse_line(b"null", ["text"])[1][0] == "not a JSON object"
    assert parse_line(b" \t", ["text"]) == (None, None)  # blank


def test_missing_key_among_several_keys_skips_the_whole_line(sp_model, tmp_path, capsys):
    src = tmp_path / "k.jsonl"
    src.write_text('{"a": "x one", "b": "y one"}\n{"a": "x two"}\n{"a": "x three", "b": "y three"}\n')
    rc, err = run(["--input", src, "--output-prefix", tmp_path / "o", *tok_args(sp_model),
                   "--json-keys", "a", "b", "--skip-bad-lines"], capsys)
    assert rc == 0 and "1 missing key" in err
    docs = {k: IndexedDataset(str(tmp_path / f"o_{k}_document")).num_documents for k in "ab"}
    assert docs == {"a": 2, "b": 2}  # the key datasets stay aligned document for document


@pytest.mark.parametrize("argv, words", [
    (["--input", "{d}/nope.jsonl"], "--input {d}/nope.jsonl: no such file"),
    (["--input", "{d}/*.nothing"], "--input {d}/*.nothing: no such file"),
    (["--tokenizer-model", "{d}/missing.model"], "--tokenizer-model {d}/missing.model: no such file"),
    (["--tokenizer-model", "{d}/in.jsonl"], "--tokenizer-model {d}/in.jsonl: not a SentencePiece model"),
    (["--tokenizer-type", "NullTokenizer"], "--tokenizer-type NullTokenizer is for training on ready "
                                            "token ids; preprocessing needs a tokenizer of text"),
    (["--tokenizer-type", "GPT2BPETokenizer", "--tokenizer-model", None, "--vocab-file", "{d}/in.jsonl"],
     "GPT2BPETokenizer needs --merge-file"),
    (["--vocab-file", "{d}/in.jsonl"], "--vocab-file is not used by --tokenizer-type SentencePieceTokenizer"),
    (["--tokenizer-type", "BertWordPieceCase"], "--tokenizer-model is not used by --tokenizer-type BertWordPieceCase"),
    (["--tokenizer-type", "BertWordPieceCase", "--tokenizer-model", None], "BertWordPieceCase needs --vocab-file"),
    (["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "{d}"], "--tokenizer-model {d}: no tokenizer.json there"),
    (["--workers", "0"], "--workers 0: must be at least 1"),
    (["--num-shards", "2", "--shard-index", "2"], "--shard-index 2: must be in [0, 2)"),
])
def test_bad_flags_are_clear_errors(argv, words, sp_model, tmp_path, capsys):
    d = str(tmp_path)
    (tmp_path / "in.jsonl").write_text('{"text": "hello"}\n')
    base = {"--input": f"{d}/in.jsonl", "--tokenizer-type": "SentencePieceTokenizer",
            "--tokenizer-model": sp_model, "--output-prefix": f"{d}/out/x"}
    flags = [a if a is None else a.format(d=d) for a in argv]
    for flag, value in base.items():
        if flag not in flags:
            flags += [flag, value]
    if None in flags:  # `FLAG None` drops that flag
        i = flags.index(None)
        del flags[i - 1:i + 1]
    rc, err = run(flags, capsys)
    assert rc == 2
    assert words.format(d=d) in err, err
    assert not os.path.exists(f"{d}/out")
