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
