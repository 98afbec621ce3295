import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "megalite", *args], capture_output=True, text=True)


def test_help_lists_subcommands():
    r = run("--help")
    assert r.returncode == 0
    assert "preprocess" in r.stdout and "quickstart" in r.stdout


def test_unknown_subcommand_is_a_clear_error():
    r = run("no-such-thing")
    assert r.returncode == 2
    assert "unknown subcommand 'no-such-thing'" in r.stderr
    assert "Traceback" not in r.stderr


def test_extension_is_built():
    import megalite._C as C

    assert "MMIDIDX" in C.__doc__


def test_builtin_corpus_writes_the_quickstart_corpus(corpus_jsonl, tmp_path):
    out = tmp_path / "c.jsonl"
    r = run("builtin-corpus", "--output", str(out), "--max-documents", "7")
    assert r.returncode == 0 and "wrote 7 documents" in r.stderr, r.stderr
    with open(corpus_jsonl, encoding="utf-8") as f:
        first = [next(f) for _ in range(7)]
    assert out.read_text(encoding="utf-8").splitlines(keepends=True) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]  # no temporary left
    r = run("builtin-corpus", "--output", str(tmp_path / "no" / "c.jsonl"))
    assert r.returncode == 2 and "--output" in r.stderr and "Traceback" not in r.stderr
