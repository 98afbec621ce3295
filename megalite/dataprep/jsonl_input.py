"""Reading jsonl input for the preprocessing tools: file globs, shard slices, chunks, line checks.

Sharding rule (``--shard-index i --num-shards n``): the matched files, sorted by path, are laid
end to end as one byte stream of ``T`` bytes (a ``.gz`` file counts with its compressed size).
Shard ``i`` owns the bytes ``[i*T//n, (i+1)*T//n)``. A line of a plain file belongs to the shard
that owns its first byte; a ``.gz`` file cannot be entered in the middle, so it belongs, whole,
to the shard that owns its first byte. Every line therefore lands in exactly one shard, and the
shards in index order hold the lines in the unsharded order: merging the shard outputs 0..n-1
gives the unsharded dataset byte for byte.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import zlib
from dataclasses import dataclass
from typing import Iterator, Sequence

from megalite.errors import MegaliteError

_COUNT_BLOCK = 1 << 22  # bytes per read when counting the newlines before a shard's start


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` only where there is a default worth showing (not None/False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


_DIR_PATTERNS = ("*.jsonl", "*.jsonl.gz", "*.json", "*.json.gz")


def _stem(path: str) -> str:
    """``/d/x`` for ``/d/x.jsonl``, ``/d/x.jsonl.gz``, ``/d/x.json`` (what tells copies apart)."""
    if path.endswith(".gz"):
        path = path[:-3]
    for ext in (".jsonl", ".json"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


def resolve_inputs(patterns: Sequence[str], flag: str = "--input") -> list[str]:
    """The files named by ``patterns`` (paths, globs, or directories of ``*.jsonl[.gz]``), sorted.

    Raises :class:`MegaliteError` naming ``flag`` when a pattern matches nothing, or when a
    directory or glob yields two files of one stem (``x.jsonl`` and ``x.jsonl.gz``: most likely
    one is a compressed copy of the other, and reading both would double those documents).
    Files named explicitly are taken as given.
    """
    files, expanded = set(), set()
    for pattern in patterns:
        if os.path.isdir(pattern):
            matched = [p for ext in _DIR_PATTERNS for p in glob.glob(os.path.join(pattern, ext))]
            if not matched:
                raise MegaliteError(f"{flag} {pattern}: the directory holds no .jsonl or .jsonl.gz "
                                    f"files (nor .json/.json.gz)")
        elif os.path.isfile(pattern):
            files.add(os.path.abspath(pattern))
            continue
        else:
            matched = [p for p in glob.glob(pattern) if os.path.isfile(p)]
            if not matched:
                raise MegaliteError(f"{flag} {pattern}: no such file (and no file matches it as a glob)")
        expanded.update(os.path.abspath(p) for p in matched)
    files |= expanded
    by_stem: dict[str, list[str]] = {}
    for path in sorted(files):
        by_stem.setdefault(_stem(path), []).append(path)
    for same in by_stem.values():
        if len(same) > 1 and any(p in expanded for p in same):
            raise MegaliteError(
                f"{flag}: {' and '.join(same)} have the same name but for the extension (one is "
                f"probably a compressed copy of the other) and reading both would double their "
                f"documents; remove one, or name the files to read explicitly")
    return sorted(files)


def is_gzip(path: str) -> bool:
    return path.endswith(".gz")


@dataclass(frozen=True)
class InputPiece:
    """A part of one input file that one shard reads."""

    path: str
    """The input file."""
    start: int
    """First byte offset (plain files; a line starting before it belongs to an earlier shard)."""
    end: int
    """Lines starting before this byte offset are read (plain files)."""
    whole_gzip: bool = False
    """A ``.gz`` file read whole (``start``/``end`` are then 0 and its compressed size)."""


def plan_shard(files: Sequence[str], shard_index: int = 0, num_shards: int = 1) -> list[InputPiece]:
    """The pieces of ``files`` (sorted) that shard ``shard_index`` of ``num_shards`` reads."""
    sizes = [os.path.getsize(f) for f in files]
    total = sum(sizes)
    lo, hi = shard_index * total // num_shards, (shard_index + 1) * total // num_shards
    last = shard_index == num_shards - 1
    pieces, offset = [], 0
    for path, size in zip(files, sizes):
        if is_gzip(path):
            if lo <= offset < hi or (last and offset >= hi):
                pieces.append(InputPiece(path, 0, size, whole_gzip=True))
        else:
            a, b = max(lo, offset) - offset, min(hi, offset + size) - offset
            if a < b:
                pieces.append(InputPiece(path, a, b))
        offset += size
    return pieces


class ChunkReader:
    """Reads one :class:`InputPiece` as chunks of whole lines, about ``chunk_bytes`` each.

    Iterating yields ``(line_offset, data)``: ``data`` holds complete lines (the last one may lack
    its newline at the end of the file) and ``line_offset`` counts the lines of the piece before
    it; :meth:`line_number` turns that into a line number of the whole file. ``consumed`` is
    the number of bytes of the piece read so far (compressed bytes for ``.gz``).
    """

    def __init__(self, piece: InputPiece, chunk_bytes: int = 1 << 20):
        self.piece = piece
        self.chunk_bytes = chunk_bytes
        self.consumed = 0
        self._first_byte = 0  # offset of the piece's first line in the file
        self._lines_before: int | None = None

    def line_number(self, line_offset: int) -> int:
        """1-based line number in the file of the piece's line ``line_offset`` (0-based).

        The newlines before the piece are counted only when first asked (for an error message),
        so a shard deep inside a big file does not read everything before it.
        """
        if self._lines_before is None:
            count, left = 0, self._first_byte
            with open(self.piece.path, "rb") as f:
                while left > 0:
                    block = f.read(min(_COUNT_BLOCK, left))
                    if not block:
                        break
                    count += block.count(b"\n")
                    left -= len(block)
            self._lines_before = count
        return self._lines_before + line_offset + 1

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        piece = self.piece
        with open(piece.path, "rb") as raw:
            if piece.whole_gzip:
                yield from self._chunks(gzip.GzipFile(fileobj=raw, mode="rb"), raw, None)
                return
            self._seek_to_line_start(raw)
            yield from self._chunks(raw, raw, piece.end)

    def _seek_to_line_start(self, raw) -> None:
        """Move to the first line that starts at or after ``piece.start``."""
        start = self.piece.start
        if start > 0:
            raw.seek(start - 1)
            if raw.read(1) != b"\n":  # a line began before `start`: it is an earlier shard's
                raw.readline()
        self._first_byte = raw.tell()

    def _chunks(self, stream, raw, end: int | None):
        base = 0 if end is None else self.piece.start
        pos = raw.tell()  # plain files: offset of the next unread byte
        carry, line_offset = b"", 0
        while True:
            want = self.chunk_bytes if end is None else min(self.chunk_bytes, end - pos)
            block = self._read(stream, want) if want > 0 else b""
            pos += len(block)
            if not block:
                # At `end` (or EOF): finish the line that started before `end`.
                if carry and end is not None and not carry.endswith(b"\n"):
                    carry += stream.readline()
                self.consumed = raw.tell() - base
                if carry:
                    yield line_offset, carry
                return
            data = carry + block
            cut = data.rfind(b"\n") + 1
            carry = data[cut:]
            self.consumed = raw.tell() - base
            if cut:
                yield line_offset, data[:cut]
                line_offset += data.count(b"\n", 0, cut)

    def _read(self, stream, n: int) -> bytes:
        try:
            return stream.read(n)
        except (OSError, EOFError, zlib.error) as e:  # corrupt or truncated .gz
            raise MegaliteError(f"{self.piece.path}: cannot decompress ({e})")


class ChunkStream:
    """``(reader, line_offset, data)`` over all pieces in order; ``bytes_read``, read just after a
    chunk is yielded, is the input position at that chunk's end."""

    def __init__(self, pieces, chunk_bytes: int):
        self.pieces, self.chunk_bytes = pieces, chunk_bytes
        self._finished_bytes = 0
        self._reader = None

    @property
    def bytes_read(self) -> int:
        return self._finished_bytes + (self._reader.consumed if self._reader else 0)

    def __iter__(self):
        for piece in self.pieces:
            self._reader = ChunkReader(piece, self.chunk_bytes)
            for line_offset, data in self._reader:
                yield self._reader, line_offset, data
            self._finished_bytes += self._reader.consumed
            self._reader = None


def split_lines(data: bytes) -> list[bytes]:
    """The lines of a chunk, without their newlines."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return lines


# Reasons a line is rejected, as counted in the tools' summaries.
BAD_JSON, BAD_UTF8, BAD_UNICODE, NOT_OBJECT, MISSING_KEY, NOT_STRING, EMPTY = (
    "malformed JSON", "invalid UTF-8", "invalid Unicode escape", "not a JSON object", "missing key",
    "not a string", "empty document")

try:  # orjson parses ~3x faster than json; the accepted lines and texts are the same (see below)
    from orjson import loads as _fast_loads
except ImportError:  # pragma: no cover - optional
    _fast_loads = None


def _slow_parse(line: bytes):
    """``(record, None)``, ``(None, None)`` for a blank line, or ``(None, (reason, message))``."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, (BAD_UTF8, f"invalid UTF-8 at byte {e.start} of the line")
    if not text.strip():
        return None, None
    try:
        return json.loads(text), None
    except ValueError as e:
        msg = getattr(e, "msg", str(e))
        col = getattr(e, "colno", None)
        if col:  # some of json's messages end in "at" already ("Unterminated string starting at")
            msg = msg[:-3] if msg.endswith(" at") else msg
            msg += f" at column {col}"
        return None, (BAD_JSON, f"malformed JSON ({msg})")


def parse_line(line: bytes, keys: Sequence[str]):
    """Check one jsonl line; return ``(texts, None)`` or ``(None, (reason, message))``.

    ``texts`` has one string per key. A blank line returns ``(None, None)`` (callers skip it).
    The standard ``json`` module decides what is valid: orjson, when installed, is only a fast
    path for the lines it accepts (it rejects some that json accepts, such as NaN values, which
    then take the json path); the strings it returns are the same.
    """
    record = None
    if _fast_loads is not None:
        try:
            record = _fast_loads(line)
        except ValueError:
            record = None
    checked_unicode = record is not None  # orjson rejects lone surrogates; json lets them through
    if record is None:
        record, bad = _slow_parse(line)
        if bad is not None or record is None and not line.strip():
            return None, bad
    if not isinstance(record, dict):
        return None, (NOT_OBJECT, f"expected a JSON object, got {type(record).__name__}")
    texts = []
    for key in keys:
        if key not in record:
            return None, (MISSING_KEY, f"missing key {key!r}")
        value = record[key]
        if not isinstance(value, str):
            return None, (NOT_STRING, f"value of {key!r} is {type(value).__name__}, not a string")
        if not value or value.isspace():
            return None, (EMPTY, f"value of {key!r} is empty")
        if not checked_unicode:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                return None, (BAD_UNICODE, f"value of {key!r} has a lone surrogate "
                                           f"(\\u{ord(value[e.start]):04x}), which is not Unicode text")
        texts.append(value)
    return texts, None


def iter_records(files: Sequence[str], keys: Sequence[str], skip_bad_lines: bool = False,
                 skipped: dict | None = None) -> Iterator[list[str]]:
    """Yield the texts (one per key) of every line of ``files``, in order.

    A bad line raises :class:`MegaliteError` (``FILE:LINE: reason``) unless ``skip_bad_lines``,
    when it is counted in ``skipped[reason]`` instead.
    """
    for path in files:
        size = os.path.getsize(path)
        piece = InputPiece(path, 0, size, whole_gzip=True) if is_gzip(path) else InputPiece(path, 0, size)
        reader = ChunkReader(piece)
        for first, data in reader:
            for offset, line in enumerate(split_lines(data)):
                texts, bad = parse_line(line, keys)
                if texts is not None:
                    yield texts
                elif bad is not None:
                    if not skip_bad_lines:
                        raise MegaliteError(f"{path}:{reader.line_number(first + offset)}: {bad[1]}")
                    if skipped is not None:
                        skipped[bad[0]] = skipped.get(bad[0], 0) + 1
