"""Stopping ``megalite preprocess`` mid-run: SIGTERM and SIGINT clean up and stop promptly (workers
included); after ``kill -9`` the next run of the same output removes the stale temporaries.

Each test starts the real command as a subprocess on a corpus big enough (~13 MB) to be still
running after its first progress line. The 10 s bounds are not performance checks: they only tell
"stops" from "hangs" (stopping takes well under a second when the machine is idle).
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from megalite.data.indexed import IndexedDataset
from megalite.data.tokenizers import build_tokenizer

pytestmark = pytest.mark.timeout(240)
STOP_BOUND_S = 10


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory) -> str:
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while seven wizards hex jolly zebras".split()
    path = tmp_path_factory.mktemp("big") / "big.jsonl"
    with open(path, "w") as f:
        for _ in range(30000):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(80))}) + "\n")
    return str(path)


def start(corpus, prefix, sp_model):
    """The command, in its own session (so a signal can go to its whole process group), once its
    first progress line shows it is mid-run."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "megalite", "preprocess", "--input", corpus, "--output-prefix", prefix,
         "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model,
         "--workers", "2", "--log-interval", "500", "--chunk-bytes", "65536"],
        stderr=subprocess.PIPE, text=True, start_new_session=True)
    first = proc.stderr.readline()
    assert "docs" in first and "% of input" in first, first
    return proc


def live_processes_in_session(sid: int) -> list[int]:
    """Pids of the processes (zombies aside) of session ``sid``: the command's workers."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:
            found.append(int(name))
    return found


@pytest.mark.parametrize("signum, to_group", [(signal.SIGTERM, False), (signal.SIGINT, True)],
                         ids=["SIGTERM-to-parent", "SIGINT-to-group (Ctrl-C)"])
def test_stop_signal_cleans_up_and_stops_promptly(signum, to_group, big_corpus, sp_model, tmp_path):
    out = tmp_path / "out"
    proc = start(big_corpus, str(out / "ds"), sp_model)
    temporaries = os.listdir(out)
    assert any(".bin.tmp-" in n for n in temporaries), temporaries  # mid-run: there is something to clean
    t0 = time.monotonic()
    (os.killpg if to_group else os.kill)(proc.pid, signum)
    rc = proc.wait(timeout=STOP_BOUND_S)
    assert time.monotonic() - t0 < STOP_BOUND_S
    err = proc.stderr.read()
    assert rc == 128 + signum, err
    assert f"stopped by {signal.Signals(signum).name}" in err and "Traceback" not in err, err
    assert os.listdir(out) == []  # no temporaries, no final files
    deadline = time.monotonic() + STOP_BOUND_S
    while live_processes_in_session(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert live_processes_in_session(proc.pid) == []  # the workers went too


def test_rerun_after_kill_9_removes_stale_temporaries_of_its_own_output(big_corpus, sp_model, tmp_path):
    out = tmp_path / "out"
    proc = start(big_corpus, str(out / "ds"), sp_model)
    proc.kill()
    proc.wait(timeout=STOP_BOUND_S)
    proc.stderr.close()
    stale = sorted(os.listdir(out))
    assert stale and all(f".tmp-{proc.pid}-" in n for n in stale), stale
    # What the rerun must keep: a live process's temporary, and other outputs' stale ones.
    live = out / f"ds_text_document.bin.tmp-{os.getpid()}-0badc0de"
    other = out / f"ds2_text_document.bin.tmp-{proc.pid}-0badc0de"
    live.write_bytes(b"x")
    other.write_bytes(b"x")

    small = tmp_path / "small.jsonl"
    texts = ["A short first document.", "And a second one."]
    small.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    r = subprocess.run([sys.executable, "-m", "megalite", "preprocess", "--input", str(small),
                        "--output-prefix", str(out / "ds"), "--tokenizer-type", "SentencePieceTokenizer",
                        "--tokenizer-model", sp_model, "--append-eod"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for name in stale:
        assert f"removed {out / name}" in r.stderr
    assert sorted(os.listdir(out)) == sorted([live.name, other.name, "ds_text_document.bin",
                                              "ds_text_document.idx"])
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=sp_model)
    ds = IndexedDataset(str(out / "ds_text_document"))
    assert [ds[i].tolist() for i in range(len(ds))] == [tok.encode(t) + [tok.eod] for t in texts]
