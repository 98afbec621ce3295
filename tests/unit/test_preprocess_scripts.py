"""The command-line entry points as users run them: ``python tools/preprocess/*.py`` with
Megatron-LM's flag names, and ``launch/slurm/preprocess_array.sbatch`` (shards + merge, run
here without SLURM through its documented ``SLURM_ARRAY_TASK_ID=i`` / ``--merge`` paths)."""
from __future__ import annotations

import filecmp
import os
import subprocess
import sys

import pytest

from megalite.data.indexed import IndexedDataset
from megalite.data.tokenizers import build_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOLS = os.path.join(REPO, "tools", "preprocess")
SBATCH = os.path.join(REPO, "launch", "slurm", "preprocess_array.sbatch")


def run(cmd, cwd, env=None):
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=None if env is None else {**os.environ, **env})


@pytest.fixture(scope="module")
def small_corpus(corpus_jsonl, tmp_path_factory):
    path = tmp_path_factory.mktemp("small") / "small.jsonl"
    with open(corpus_jsonl, "rb") as f:
        path.write_bytes(b"".join(f.readlines()[:400]))
    return str(path)


def test_scripts_run_directly_with_megatron_flags(small_corpus, corpus_texts, tmp_path):
    # Run from an unrelated directory: the scripts must not depend on the working directory.
    r = run([sys.executable, os.path.join(TOOLS, "train_tokenizer.py"), "--input", small_corpus,
             "--output-prefix", "tok", "--vocab-size", "600", "--model-type", "bpe"], tmp_path)
    assert r.returncode == 0, r.stderr
    r = run([sys.executable, os.path.join(TOOLS, "preprocess_data.py"), "--input", small_corpus,
             "--output-prefix", "my-corpus", "--json-keys", "text", "--tokenizer-type",
             "SentencePieceTokenizer", "--tokenizer-model", "tok.model", "--append-eod",
             "--workers", "2", "--log-interval", "100"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "400 docs" in r.stderr and "done: 400 documents" in r.stderr  # progress + summary
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(tmp_path / "tok.model"))
    ds = IndexedDataset(str(tmp_path / "my-corpus_text_document"))
    assert ds.num_documents == 400
    for d in (0, 199, 399):
        assert ds[d].tolist() == tok.encode(corpus_texts[d]) + [tok.eod]
    r = run([sys.executable, os.path.join(TOOLS, "merge_datasets.py"), "--input",
             "my-corpus_text_document", "my-corpus_text_document.idx", "--output-prefix", "twice"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert IndexedDataset(str(tmp_path / "twice")).num_documents == 800


def test_script_splits_sentences(small_corpus, sp_model, tmp_path):
    r = run([sys.executable, os.path.join(TOOLS, "preprocess_data.py"), "--input", small_corpus,
             "--output-prefix", "c", "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
             sp_model, "--split-sentences", "--append-eod", "--workers", "2", "--lang", "english"],
            tmp_path)
    assert r.returncode == 0, r.stderr
    assert "done: 400 documents, " in r.stderr and " sentences, " in r.stderr
    ds = IndexedDataset(str(tmp_path / "c_text_sentence"))
    assert ds.num_documents == 400 and len(ds) > 800


@pytest.mark.parametrize("script, argv, words", [
    ("preprocess_data.py", ["--input", "missing.jsonl", "--output-prefix", "o", "--tokenizer-type",
                            "SentencePieceTokenizer", "--tokenizer-model", "x"], "--input missing.jsonl"),
    ("merge_datasets.py", ["--input", "nothing_here", "--output-prefix", "o"], "--input nothing_here"),
    ("train_tokenizer.py", ["--input", "missing.jsonl", "--output-prefix", "o"], "--input missing.jsonl"),
])
def test_scripts_report_errors_cleanly(script, argv, words, tmp_path):
    r = run([sys.executable, os.path.join(TOOLS, script), *argv], tmp_path)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and words in r.stderr and "Traceback" not in r.stderr


def test_sbatch_script_is_valid_bash():
    r = run(["bash", "-n", SBATCH], REPO)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("extra_args", ["--append-eod", "--append-eod --split-sentences"])
def test_sbatch_shards_and_merge_equal_an_unsharded_run(extra_args, small_corpus, sp_model, tmp_path):
    level = "sentence" if "--split-sentences" in extra_args else "document"
    env = {"INPUT": small_corpus, "OUTPUT_PREFIX": str(tmp_path / "out" / "corpus"), "NUM_SHARDS": "3",
           "TOKENIZER_MODEL": sp_model, "WORKERS": "1", "PYTHON": sys.executable,
           "EXTRA_ARGS": extra_args}
    # Even when the tests themselves run inside a SLURM job: no merge submission from "task 0".
    env.update({key: "" for key in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN")})
    r = run(["bash", SBATCH, "--merge"], tmp_path, env)
    assert r.returncode == 2 and "shard outputs missing" in r.stderr  # before any shard ran
    for i in range(3):
        r = run(["bash", SBATCH], tmp_path, {**env, "SLURM_ARRAY_TASK_ID": str(i)})
        assert r.returncode == 0, r.stderr
    r = run(["bash", SBATCH, "--merge"], tmp_path, env)
    assert r.returncode == 0, r.stderr
    r = run(["bash", SBATCH], tmp_path, {**env, "SLURM_ARRAY_TASK_ID": "3"})
    assert r.returncode == 2 and "not in [0, NUM_SHARDS=3)" in r.stderr
    r = run([sys.executable, "-m", "megalite", "preprocess", "--input", small_corpus, "--output-prefix",
             str(tmp_path / "full"), "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
             sp_model, *extra_args.split()], tmp_path)
    assert r.returncode == 0, r.stderr
    for ext in ("bin", "idx"):
        assert filecmp.cmp(tmp_path / f"full_text_{level}.{ext}",
                           tmp_path / "out" / f"corpus_text_{level}.{ext}", shallow=False)
