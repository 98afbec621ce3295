"""``megalite preprocess`` input and output paths a new user gets wrong, and its progress lines:
copies of one file under two extensions are refused (not read twice), a directory without jsonl,
an output under a regular file, json's own wording in bad-line messages, progress by bytes done."""
from __future__ import annotations

import gzip
import json
import os
import re

from megalite.cli import run_main
from megalite.data.indexed import IndexedDataset
from megalite.dataprep import preprocess_data


def run(argv, capsys):
    rc = run_main(preprocess_data.main, [str(a) for a in argv])
    return rc, capsys.readouterr().err


def tok(sp_model, *extra):
    return ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model,
            "--log-interval", "1000000", *extra]


def write_pair(directory):
    """``x.jsonl`` and its gzip copy ``x.jsonl.gz``, as one gets after ``gzip -k``."""
    os.makedirs(directory, exist_ok=True)
    data = b'{"text": "one document"}\n{"text": "another document"}\n'
    plain, packed = os.path.join(directory, "x.jsonl"), os.path.join(directory, "x.jsonl.gz")
    with open(plain, "wb") as f:
        f.write(data)
    with gzip.open(packed, "wb") as f:
        f.write(data)
    return plain, packed


def test_a_file_and_its_gzip_copy_in_a_directory_or_glob_are_refused(sp_model, tmp_path, capsys):
    plain, packed = write_pair(tmp_path / "in")
    for pattern in (tmp_path / "in", tmp_path / "in" / "x.*"):
        rc, err = run(["--input", pattern, "--output-prefix", tmp_path / "out" / "o", *tok(sp_model)], capsys)
        assert rc == 2
        assert f"{plain} and {packed} have the same name but for the extension" in err, err
        assert "remove one, or name the files to read explicitly" in err
    assert not os.path.exists(tmp_path / "out")


def test_both_named_explicitly_are_both_read(sp_model, tmp_path, capsys):
    plain, packed = write_pair(tmp_path / "in")
    rc, err = run(["--input", plain, packed, "--output-prefix", tmp_path / "o", *tok(sp_model)], capsys)
    assert rc == 0, err
    assert IndexedDataset(str(tmp_path / "o_text_document")).num_documents == 4  # as asked


def test_directory_without_jsonl_says_so(sp_model, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("not jsonl")
    rc, err = run(["--input", tmp_path / "in", "--output-prefix", tmp_path / "o", *tok(sp_model)], capsys)
    assert rc == 2
    assert f"--input {tmp_path / 'in'}: the directory holds no .jsonl or .jsonl.gz files" in err, err
    assert "no such file" not in err


def test_output_prefix_under_a_regular_file_names_that_file(sp_model, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "hello"}\n')
    (tmp_path / "somefile.txt").write_text("x")
    prefix = tmp_path / "somefile.txt" / "sub" / "out"
    rc, err = run(["--input", src, "--output-prefix", prefix, *tok(sp_model)], capsys)
    assert rc == 2
    assert f"--output-prefix {prefix}: {tmp_path / 'somefile.txt'} is a file, not a directory" in err, err
    assert "File exists" not in err


def test_json_messages_ending_in_at_are_not_doubled(sp_model, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"text": "fine"}\n{"text": "never closed\n{"text": "tab\there"}\n')
    rc, err = run(["--input", src, "--output-prefix", tmp_path / "o", *tok(sp_model), "--skip-bad-lines"], capsys)
    assert rc == 0, err
    assert f"{src}:2: malformed JSON (Unterminated string starting at column 10)" in err, err
    assert f"{src}:3: malformed JSON (Invalid control character at column 14)" in err, err
    assert "at at" not in err


def test_progress_counts_bytes_whose_results_came_back(sp_model, tmp_path, capsys):
    """One file of exactly three 1,000-byte chunks: all three fit the in-flight window, so the
    reader is at 100% before the first result returns; progress must still go 33%, 67%, 100%."""
    src = tmp_path / "one.jsonl"
    lines = []
    for i in range(30):
        head = json.dumps({"text": f"document {i:02d} "})[:-2]
        lines.append(head + "x" * (97 - len(head)) + '"}')  # 99 bytes + newline
    src.write_text("\n".join(lines) + "\n")
    assert os.path.getsize(src) == 3000
    rc, err = run(["--input", src, "--output-prefix", tmp_path / "o", *tok(sp_model),
                   "--log-interval", "1", "--chunk-bytes", "1000", "--workers", "1"], capsys)
    assert rc == 0, err
    shares = [float(x) for x in re.findall(r"\| ([\d.]+)% of input", err)]
    assert shares == [33.3, 66.7, 100.0], err
