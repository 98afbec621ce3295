"""``megalite preprocess`` (also ``tools/preprocess/preprocess_data.py``): jsonl -> .bin/.idx.

Data flow: the parent streams the input as chunks of whole lines (about ``--chunk-bytes`` each)
and keeps at most ``4 x --workers`` chunks in flight; worker processes parse and tokenise a chunk
and return flat numpy token arrays; the parent takes the results back in submission order and
appends each document through the C++ MMIDIDX writer. Order is fixed by the chunk sequence, so the
output bytes are the same for any ``--workers``, and memory stays bounded whatever the input size.

With ``--split-sentences`` a worker also cuts each text into sentences
(:mod:`megalite.dataprep.sentences`) and each sentence becomes one sequence of its document.

Shards (``--shard-index i --num-shards n``) follow :mod:`megalite.dataprep.jsonl_input`'s rule: a
contiguous byte slice of the sorted inputs, lines owned by the shard holding their first byte,
``.gz`` files assigned whole.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import contextlib
import itertools
import multiprocessing
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from megalite.errors import MegaliteError
from megalite.dataprep.jsonl_input import (ChunkStream, HelpFormatter, parse_line, plan_shard,
                                           resolve_inputs, split_lines)
from megalite.dataprep.sentences import (SentenceSplitter, add_sentence_documents, group_sentences,
                                         check_newlines_survive, language_code, load_segmenter,
                                         split_values)

MAX_SHOWN_SKIPS = 10  # skipped lines reported one by one before only counting them


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megalite preprocess",
        description="Tokenize jsonl into Megatron-compatible MMIDIDX token files "
                    "OUTPUT_PREFIX_{KEY}_document.bin/.idx (uint16 tokens when the vocabulary has "
                    "fewer than 65,500 entries, else int32). One document per jsonl line; blank "
                    "lines are ignored. Each document is one sequence, or with --split-sentences "
                    "one sequence per sentence (OUTPUT_PREFIX_{KEY}_sentence.bin/.idx).",
        formatter_class=HelpFormatter)
    g = p.add_argument_group("input")
    g.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_GLOB",
                   help="jsonl or jsonl.gz files, globs (quote them) or directories; all matches "
                        "are read in sorted path order. A directory or glob that yields both "
                        "x.jsonl and x.jsonl.gz is refused (a copy would be read twice); name "
                        "files explicitly to read them all")
    g.add_argument("--json-keys", nargs="+", default=["text"],
                   help="keys to tokenize; one output dataset per key (a line must have them all)")
    g.add_argument("--skip-bad-lines", action="store_true",
                   help="skip bad lines (malformed JSON, invalid UTF-8 or Unicode escape, not an "
                        "object, missing key, non-string or empty value) and count them per reason; "
                        "without it the first bad line stops the run with FILE:LINE: reason, exit "
                        "status 2, and no output")
    g.add_argument("--split-sentences", action="store_true",
                   help="one sequence per sentence (splitter: sentencex), grouped into documents "
                        "by the .idx document index; outputs named _sentence, not _document. "
                        "Sentences that tokenize to nothing are dropped; --append-eod ends a "
                        "document's last sentence (a document of no tokens gets no sentence)")
    g.add_argument("--keep-newlines", action="store_true",
                   help="with --split-sentences: a sentence keeps the whitespace after it (else "
                        "it is stripped); refused with a tokenizer that drops newlines")
    g.add_argument("--lang", metavar="LANG",
                   help="with --split-sentences: language of the splitting rules, a code (en, zh, "
                        "de, ...) or an NLTK name (english, ...); default en (also ends at 。！？)")
    g.add_argument("--dataset-impl", choices=("mmap",), default="mmap",
                   help="accepted for old Megatron command lines; MMIDIDX (mmap) is the only format")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True,
                   help="SentencePieceTokenizer | HuggingFaceTokenizer (with --tokenizer-model) | "
                        "BertWordPieceLowerCase | BertWordPieceCase (with --vocab-file) | "
                        "GPT2BPETokenizer (with --vocab-file and --merge-file)")
    g.add_argument("--tokenizer-model", help="SentencePiece .model, or tokenizer.json (or its directory)")
    g.add_argument("--vocab-file", help="WordPiece vocab.txt, or GPT-2 vocab.json")
    g.add_argument("--merge-file", help="GPT-2 merges.txt (GPT2BPETokenizer)")
    g.add_argument("--append-eod", action="store_true",
                   help="append the end-of-document id (SentencePiece eos, [SEP], HF eos, "
                        "<|endoftext|>) to each document")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True,
                   help="output datasets are OUTPUT_PREFIX_{KEY}_document (sharded runs: "
                        "OUTPUT_PREFIX_shardIIIII-of-NNNNN_{KEY}_document), written under temporary "
                        "names and renamed when complete; SIGINT/SIGTERM stop the run and remove "
                        "them (exit 130/143), and a run removes those a killed run of the same "
                        "outputs left behind")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1,
                   help="tokenizer worker processes (the output does not depend on it); at most "
                        "4 x WORKERS chunks are in flight, which bounds memory")
    g.add_argument("--log-interval", type=int, default=1000,
                   help="print progress on stderr every this many documents (documents, tokens, "
                        "MB/s, docs/s, share of input done and ETA, counting the input whose tokens "
                        "came back from the workers; compressed bytes for .gz input)")
    g.add_argument("--chunk-bytes", type=int, default=1 << 20,
                   help="input bytes per work item sent to a worker")
    g = p.add_argument_group("sharding (e.g. one SLURM array task per shard)")
    g.add_argument("--shard-index", type=int, default=0, help="which shard this run writes, 0-based")
    g.add_argument("--num-shards", type=int, default=1,
                   help="split the input into this many contiguous shards: the sorted files are "
                        "treated as one byte stream cut into equal byte ranges; a line belongs to "
                        "the shard holding its first byte, a .gz file goes whole to the shard "
                        "holding its first byte. `megalite merge-datasets` over shards 0..N-1 in "
                        "order gives exactly the unsharded output")
    return p


def output_prefixes(output_prefix: str, keys, shard_index: int = 0, num_shards: int = 1,
                    split_sentences: bool = False) -> list[str]:
    """The dataset prefix written for each key (shard-tagged when ``num_shards > 1``; ``_sentence``
    instead of ``_document`` when sentences are split, as Megatron-LM names them)."""
    base = output_prefix
    if num_shards > 1:
        base = f"{output_prefix}_shard{shard_index:05d}-of-{num_shards:05d}"
    level = "sentence" if split_sentences else "document"
    return [f"{base}_{key}_{level}" for key in keys]


# ---------------------------------------------------------------------------------------------
# Worker side


@dataclass
class _WorkerConfig:
    """What a worker process needs to rebuild the tokenizer and encode chunks."""

    tokenizer_type: str
    """``--tokenizer-type``."""
    tokenizer_model: str | None
    """``--tokenizer-model``."""
    vocab_file: str | None
    """``--vocab-file``."""
    merge_file: str | None
    """``--merge-file``."""
    keys: list
    """``--json-keys``."""
    append_eod: bool
    """Append the tokenizer's eod to each document."""
    dtype: str
    """numpy dtype name of the output tokens."""
    skip_bad_lines: bool
    """Keep going past bad lines (else stop the chunk at the first)."""
    split_sentences: bool = False
    """``--split-sentences``."""
    keep_newlines: bool = False
    """``--keep-newlines``."""
    lang: str | None = None
    """``--lang``."""


@dataclass
class ChunkResult:
    """Tokens of one chunk. ``tokens[k]``: 1-D, all documents of key k back to back;
    ``lengths[k]``: int64 ``[sequences]`` (one per document, or per sentence when splitting);
    ``sentences[k]``: int64 ``[documents]``, sentences per document (only when splitting);
    ``bad``: ``(line offset in the piece, reason, message)``."""

    tokens: list = field(default_factory=list)
    lengths: list = field(default_factory=list)
    sentences: list = field(default_factory=list)
    documents: int = 0
    blank: int = 0
    bad: list = field(default_factory=list)


class _ChunkEncoder:
    """Parses and tokenises chunks; one per worker process (or used directly, in-process)."""

    def __init__(self, cfg: _WorkerConfig):
        from megalite.data.tokenizers import build_tokenizer

        self.cfg = cfg
        self.tokenizer = build_tokenizer(cfg.tokenizer_type, cfg.tokenizer_model, cfg.vocab_file,
                                         cfg.merge_file)
        self.dtype = np.dtype(cfg.dtype)
        self.splitter = (SentenceSplitter(cfg.lang, cfg.keep_newlines) if cfg.split_sentences
                         else None)

    def __call__(self, line_offset: int, data: bytes) -> ChunkResult:
        cfg, result = self.cfg, ChunkResult()
        texts = [[] for _ in cfg.keys]  # per key: the documents' texts (lists of sentences)
        eod = self.tokenizer.eod if cfg.append_eod else None
        for i, line in enumerate(split_lines(data)):
            values, bad = parse_line(line, cfg.keys)
            if values is not None and self.splitter is not None:
                values, bad = split_values(self.splitter, cfg.keys, values)
            if values is None:
                if bad is None:
                    result.blank += 1
                    continue
                result.bad.append((line_offset + i, *bad))
                if not cfg.skip_bad_lines:
                    return result
                continue
            for column, value in zip(texts, values):
                column.append(value)
        result.documents = len(texts[0])
        for column in texts:
            if self.splitter is not None:
                ids = self.tokenizer.encode_batch([s for doc in column for s in doc])
                flat, lengths, per_doc = group_sentences(ids, [len(doc) for doc in column], eod)
                result.sentences.append(per_doc)
            else:
                ids = self.tokenizer.encode_batch(column)
                if eod is not None:
                    for doc in ids:
                        doc.append(eod)
                lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
                flat = itertools.chain.from_iterable(ids)
            result.tokens.append(np.fromiter(flat, dtype=self.dtype, count=int(lengths.sum())))
            result.lengths.append(lengths)
        return result


# The worker process's encoder: a ProcessPoolExecutor initializer can only leave state behind
# in a module global. Set in worker processes only, never in the parent.
_worker_encoder: _ChunkEncoder | None = None


def _init_worker(cfg: _WorkerConfig, parent_pid: int) -> None:
    global _worker_encoder
    # Stopping is the parent's job: a Ctrl-C or scancel reaches the whole process group, and the
    # parent kills the workers as it cleans up; a worker dying on its own would only turn the stop
    # into a "worker died" error (and a KeyboardInterrupt traceback per worker). The parent spawned
    # us with these signals blocked, so none can arrive before they are ignored.
    for signum in _STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    # Parallelism comes from the worker processes; a tokenizer's own thread pool would
    # oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_encoder = _ChunkEncoder(cfg)
    # If the parent is killed (SIGKILL, OOM killer) the pool's queues never close, because every
    # worker holds both ends; without this the workers would wait forever as orphans.
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()


def _exit_when_orphaned(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


def _encode_in_worker(line_offset: int, data: bytes) -> ChunkResult:
    return _worker_encoder(line_offset, data)


# ---------------------------------------------------------------------------------------------
# Parent side

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(KeyboardInterrupt):
    """Raised in the main thread by SIGINT or SIGTERM; the run unwinds and leaves nothing behind."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _StopSignals:
    """While armed, SIGINT and SIGTERM raise :class:`Stopped` in the main thread (SIGTERM would
    otherwise kill the process with its temporaries left behind). :meth:`disarm` before cleaning
    up or renaming outputs into place: a further signal is then only noted in ``received``, so it
    cannot interrupt that half-way. Outside the main thread (no signal handlers) it does nothing."""

    def __init__(self):
        self.received: int | None = None
        self.armed = False
        self._old = {}

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in _STOP_SIGNALS:
                self._old[signum] = signal.signal(signum, self._handle)
            self.armed = True
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
        if self.armed:
            self.armed = False
            raise Stopped(signum)

    def disarm(self) -> None:
        self.armed = False

    def __exit__(self, *exc) -> None:
        self.armed = False
        for signum, old in self._old.items():
            signal.signal(signum, old)


@contextlib.contextmanager
def _stop_signals_blocked():
    """Blocks SIGINT/SIGTERM in this thread; a worker spawned inside inherits the mask, so it is
    never stopped before :func:`_init_worker` ignores them. A signal sent meanwhile stays pending
    and is handled on leaving."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _close_pool(pool: cf.ProcessPoolExecutor, failed: bool) -> None:
    """Shuts the pool down; on failure first kills the workers, so that chunks in flight are
    dropped at once instead of finishing (a stop must not wait for them)."""
    if failed:
        workers = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for worker in workers:
            with contextlib.suppress(Exception):
                worker.kill()
        for worker in workers:
            with contextlib.suppress(Exception):
                worker.join(timeout=5)
    pool.shutdown(wait=True, cancel_futures=True)


class _Progress:
    """Counts and the periodic progress line on stderr."""

    def __init__(self, total_bytes: int, log_interval: int):
        """``total_bytes``: of the input this run reads; ``maybe_log`` gets the part of it whose
        results have come back from the workers (not what the reader has read ahead)."""
        self.t0 = time.perf_counter()
        self.total_bytes = total_bytes
        self.log_interval = log_interval
        self.documents = self.sequences = self.tokens = self.blank = 0
        self.skipped = collections.Counter()
        self.shown_skips = 0
        self._next_log = log_interval

    def maybe_log(self, bytes_done: int) -> None:
        if self.documents < self._next_log:
            return
        self._next_log = (self.documents // self.log_interval + 1) * self.log_interval
        dt = max(time.perf_counter() - self.t0, 1e-9)
        line = (f"{self.documents} docs, {self.tokens} tokens | {bytes_done / dt / 1e6:.2f} MB/s, "
                f"{self.documents / dt:.0f} docs/s, {self.tokens / dt:.0f} tokens/s")
        if self.total_bytes > 0 and bytes_done > 0:
            frac = min(bytes_done / self.total_bytes, 1.0)
            line += f" | {100 * frac:.1f}% of input, ETA {dt * (1 - frac) / frac:.0f} s"
        print(line, file=sys.stderr, flush=True)


def _check_args(args) -> None:
    for flag, value in (("--keep-newlines", args.keep_newlines), ("--lang", args.lang)):
        if value and not args.split_sentences:
            raise MegaliteError(f"{flag} only applies to sentence splitting: add --split-sentences "
                                f"or leave {flag} out")
    if args.split_sentences:
        language_code(args.lang)
        load_segmenter()
    if args.tokenizer_type == "NullTokenizer":  # (training on ids only: nothing to tokenize)
        raise MegaliteError("--tokenizer-type NullTokenizer is for training on ready token ids; "
                            "preprocessing needs a tokenizer of text")
    for flag, value in (("--workers", args.workers), ("--log-interval", args.log_interval),
                        ("--chunk-bytes", args.chunk_bytes), ("--num-shards", args.num_shards)):
        if value < 1:
            raise MegaliteError(f"{flag} {value}: must be at least 1")
    if not 0 <= args.shard_index < args.num_shards:
        raise MegaliteError(f"--shard-index {args.shard_index}: must be in [0, {args.num_shards})")
    if len(set(args.json_keys)) != len(args.json_keys):
        raise MegaliteError(f"--json-keys {' '.join(args.json_keys)}: a key is repeated")


def preprocess(args: argparse.Namespace) -> dict:
    """Run the tool for parsed ``args``; return the summary (also used by the benchmark)."""
    from megalite.data.indexed import (IndexedDatasetBuilder, best_dtype, check_output_parent,
                                       remove_stale_temporaries)
    from megalite.data.tokenizers import build_tokenizer

    _check_args(args)
    check_output_parent(args.output_prefix, "--output-prefix")
    files = resolve_inputs(args.input)
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_file,
                                args.merge_file)
    dtype = np.dtype(best_dtype(tokenizer.vocab_size))
    if args.keep_newlines:
        check_newlines_survive(tokenizer, args.tokenizer_type)
    cfg = _WorkerConfig(args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.merge_file,
                        list(args.json_keys), args.append_eod, dtype.name, args.skip_bad_lines,
                        args.split_sentences, args.keep_newlines, args.lang)
    pieces = plan_shard(files, args.shard_index, args.num_shards)
    prefixes = output_prefixes(args.output_prefix, args.json_keys, args.shard_index, args.num_shards,
                               args.split_sentences)
    for prefix in prefixes:  # what an earlier run of these outputs left when it was kill -9'ed
        for path in remove_stale_temporaries(prefix):
            print(f"removed {path}, left by an earlier run that did not finish", file=sys.stderr)
    progress = _Progress(sum(p.end - p.start for p in pieces), args.log_interval)
    stream = ChunkStream(pieces, args.chunk_bytes)

    def consume(reader, result: ChunkResult, builders, bytes_done: int) -> None:
        for offset, reason, message in result.bad:
            where = f"{reader.piece.path}:{reader.line_number(offset)}"
            if not args.skip_bad_lines:
                raise MegaliteError(f"{where}: {message}")
            progress.skipped[reason] += 1
            if progress.shown_skips < MAX_SHOWN_SKIPS:
                progress.shown_skips += 1
                more = " (further skipped lines are only counted)" if progress.shown_skips == MAX_SHOWN_SKIPS else ""
                print(f"skipped {where}: {message}{more}", file=sys.stderr)
        for k, (builder, flat, lengths) in enumerate(zip(builders, result.tokens, result.lengths)):
            if result.sentences:
                add_sentence_documents(builder, flat, lengths, result.sentences[k])
            else:
                builder.add_documents(flat, lengths)  # one C++ call per chunk, not per document
        progress.documents += result.documents
        progress.sequences += sum(int(lengths.size) for lengths in result.lengths)
        progress.tokens += sum(int(flat.size) for flat in result.tokens)
        progress.blank += result.blank
        progress.maybe_log(bytes_done)

    with _StopSignals() as stop, contextlib.ExitStack() as stack:
        builders = [stack.enter_context(IndexedDatasetBuilder(p, dtype)) for p in prefixes]
        pool = cf.ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"),
                                      initializer=_init_worker, initargs=(cfg, os.getpid()))

        def close_pool(exc_type, exc, tb) -> None:  # runs before the builders abort
            if exc_type is not None:
                stop.disarm()  # a second signal must not cut the cleanup short
            _close_pool(pool, failed=exc_type is not None)

        stack.push(close_pool)
        window = collections.deque()  # (reader, line_offset, future, bytes at its end), in order

        def drain(keep: int) -> None:
            while len(window) > keep:
                reader, line_offset, future, bytes_done = window.popleft()
                try:
                    result = future.result()
                except cf.process.BrokenProcessPool as e:
                    raise MegaliteError(f"a tokenizer worker process died ({e}); out of memory? "
                                        f"try fewer --workers") from None
                except MegaliteError:
                    raise
                except Exception as e:  # a tokenizer failing on some text: say where
                    raise MegaliteError(f"{reader.piece.path}: tokenizing the lines from line "
                                        f"{reader.line_number(line_offset)} failed: "
                                        f"{type(e).__name__}: {e}") from e
                consume(reader, result, builders, bytes_done)

        max_in_flight = 4 * args.workers
        for reader, line_offset, data in stream:
            with _stop_signals_blocked():  # submit may spawn a worker
                future = pool.submit(_encode_in_worker, line_offset, data)
            window.append((reader, line_offset, future, stream.bytes_read))
            drain(max_in_flight - 1)
        drain(0)
        stop.disarm()  # all or nothing from here: the renames are not to be interrupted
        for builder in builders:
            builder.finalize()
        if stop.received is not None:
            print(f"received {signal.Signals(stop.received).name} while moving the finished "
                  f"output into place; the output is complete", file=sys.stderr)
    elapsed = time.perf_counter() - progress.t0
    return {"documents": progress.documents, "sequences": progress.sequences,
            "tokens": progress.tokens, "blank_lines": progress.blank,
            "skipped": dict(progress.skipped), "seconds": elapsed, "input_files": files,
            "input_bytes": progress.total_bytes, "outputs": prefixes, "dtype": dtype.name,
            "vocab_size": tokenizer.vocab_size}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        s = preprocess(args)
    except Stopped as e:
        name = signal.Signals(e.signum).name
        print(f"stopped by {name}: the partial output was removed, nothing was written",
              file=sys.stderr)
        return 128 + e.signum
    dt = max(s["seconds"], 1e-9)
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(s["skipped"].items())) or "none"
    outputs = "\n".join(f"  {p}.bin  {p}.idx" for p in s["outputs"])
    shard = f" (shard {args.shard_index} of {args.num_shards})" if args.num_shards > 1 else ""
    docs = f"{s['documents']} documents" + (f", {s['sequences']} sentences" if args.split_sentences else "")
    print(f"done{shard}: {docs}, {s['tokens']} tokens ({s['dtype']}) in {dt:.1f} s, "
          f"{s['tokens'] / dt:.0f} tokens/s, {s['input_bytes'] / dt / 1e6:.2f} MB/s; "
          f"skipped lines: {sum(s['skipped'].values())} ({skipped}); blank lines: {s['blank_lines']}\n"
          f"wrote:\n{outputs}", file=sys.stderr)
    if s["documents"] == 0:
        print("warning: no documents were written (empty input or shard)", file=sys.stderr)
    return 0
