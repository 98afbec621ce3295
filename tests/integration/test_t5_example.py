"""The README's T5 worked example, run as written (its commands are read from README.md, so the
example cannot drift from what works): the built-in corpus, a WordPiece vocabulary, sentence-
split token files, a short T5 training run, span filling with ``megalite generate`` and the
export to Hugging Face. Only the iteration count is lowered (30 instead of the README's 100).

Checks: every command exits 0; the model holds the T5 data's vocabulary (2000 WordPiece tokens
+ [BOS] + [EOS] + 100 sentinels); the loss falls below uniform guessing (ln 2102 = 7.65) and
keeps falling; the greedy span filling starts with the first sentinel, as every T5 target does;
the Hugging Face export loads in ``transformers`` and its greedy ``generate`` gives megalite's
tokens for the same prompt ids (both fp32 on CPU; the export's --verify bounds the logits by
1e-4, and an exact token match is the product's claim, as in test_t5_generate_tp.py).
"""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys

README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")
TRAIN_ITERS = "30"


def example_commands() -> list[list[str]]:
    """The first ```bash block of the README's ``## T5`` section, one argv per command
    (backslash continuations joined, comments dropped)."""
    text = open(README, encoding="utf-8").read()
    section = text.split("\n## T5\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(cmd, comments=True) for cmd in block.replace("\\\n", " ").splitlines()
            if shlex.split(cmd, comments=True)]


def run(argv: list[str], cwd) -> str:
    assert argv[0] == "megalite", argv
    # one thread: the fastest for this tiny model, and no OpenMP spin-waiting when CI's cores
    # are shared (measured on a loaded 2-core machine: training 9 s instead of 58 s)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "megalite", *argv[1:]], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{shlex.join(argv)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def test_readme_t5_example(tmp_path, monkeypatch):
    commands = example_commands()
    assert [c[1] for c in commands] == ["builtin-corpus", "train-tokenizer", "preprocess",
                                        "train", "generate", "convert"]
    out = {}
    for argv in commands:
        if argv[1] == "train":
            argv = argv + ["--train-iters", TRAIN_ITERS, "--log-interval", "5",
                           "--log-json", "log.jsonl"]
        out[argv[1]] = run(argv, tmp_path)

    assert "vocab 2102 (padded 2176)" in out["train"], out["train"]
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["split"] == "train"]
    assert len(losses) == 6 and losses[0] < math.log(2102) and losses[-1] < losses[0] - 0.5, \
        losses
    generated = out["generate"].strip()
    assert generated.startswith("<extra_id_0>"), generated

    # transformers' greedy generate on the export: megalite's tokens
    import torch
    import transformers

    from megalite.distributed.parallel_state import ParallelState
    from megalite.generate import build_parser, generate_text, prepare
    monkeypatch.chdir(tmp_path)   # the paths in the commands are relative
    gen, convert = commands[4], commands[5]
    args = build_parser().parse_args(gen[2:])
    prepared = prepare(args)
    ours, text = generate_text(args, ParallelState.single(), prepared=prepared)
    assert text == generated and prepared.seq2seq.names[ours[0]] == "<extra_id_0>"
    names = prepared.seq2seq.names
    assert [names[i] for i in prepared.context if i in names] == ["<extra_id_0>"]  # the prompt's
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(
        convert[convert.index("--save") + 1]).eval()
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prepared.context]), do_sample=False,
                             max_new_tokens=args.max_new_tokens)[0].tolist()
    assert theirs[0] == prepared.seq2seq.start   # the [BOS] the T5 data starts the decoder with
    stop = prepared.seq2seq.stop
    theirs = theirs[1:theirs.index(stop)] if stop in theirs else theirs[1:]
    assert theirs == ours
