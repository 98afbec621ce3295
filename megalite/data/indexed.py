"""MMIDIDX token files (``PREFIX.bin`` + ``PREFIX.idx``), byte-compatible with Megatron-LM.

The format is specified in ``shared/spec/indexed-dataset.md``: ``.bin`` holds the token ids of
every sequence back to back in one dtype; ``.idx`` holds a 34-byte header (magic, version,
dtype code, sequence count, document-index length), then int32 sequence lengths, int64 byte
pointers into ``.bin``, the int64 document index and, for multimodal builds only, int8 modes.

* :class:`IndexedDataset` reads without copying: the arrays are ``np.frombuffer`` views of a
  read-only ``mmap``; every read returns a view into the ``.bin`` map. Opening validates the
  whole file (vectorised, O(sequences) once) and raises :class:`DataFormatError` naming the file.
* :class:`IndexedDatasetBuilder` writes through the C++ ``megalite._C.IndexedDatasetBuilder``
  into temporary files beside the target and renames both into place only when complete.
* :func:`merge_datasets` concatenates datasets (``.bin`` bytes copied, index arrays shifted).

Everything here is process-local: each data-loading rank opens its own maps.
"""
from __future__ import annotations

import mmap
import os
import re
import secrets
from typing import Iterable, Sequence

import numpy as np

from megalite.errors import DataFormatError, MegaliteError

_MAGIC = b"MMIDIDX\x00\x00"
_VERSION = 1
_HEADER_BYTES = 34  # magic 9 + version 8 + dtype code 1 + sequence_count 8 + document_count 8

CODE_TO_DTYPE: dict[int, np.dtype] = {
    1: np.dtype(np.uint8), 2: np.dtype(np.int8), 3: np.dtype(np.int16), 4: np.dtype(np.int32),
    5: np.dtype(np.int64), 6: np.dtype(np.float64), 7: np.dtype(np.float32), 8: np.dtype(np.uint16),
}
DTYPE_TO_CODE: dict[np.dtype, int] = {dtype: code for code, dtype in CODE_TO_DTYPE.items()}

# Validation walks the index arrays in chunks so that it never allocates O(sequences) temporaries.
_CHUNK = 1 << 22


def best_dtype(vocab_size: int) -> np.dtype:
    """The token dtype for a vocabulary: uint16 below 65,500 entries, else int32 (Megatron's rule)."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def data_file_path(prefix) -> str:
    return str(prefix) + ".bin"


def index_file_path(prefix) -> str:
    return str(prefix) + ".idx"


def dataset_exists(prefix) -> bool:
    return os.path.isfile(index_file_path(prefix)) and os.path.isfile(data_file_path(prefix))


def check_output_parent(prefix, what: str | None = None) -> None:
    """Raise :class:`MegaliteError` when ``prefix`` cannot get a parent directory because a path
    above it is a regular file (``notes.txt/out``); ``what`` (e.g. ``"--output-prefix"``) heads
    the message. Creates nothing: the directory is made only when a dataset is written."""
    parent = os.path.dirname(os.path.abspath(str(prefix)))
    while parent and not os.path.exists(parent):
        up = os.path.dirname(parent)
        if up == parent:
            return
        parent = up
    if parent and not os.path.isdir(parent):
        head = f"{what} {prefix}" if what else f"cannot write dataset {prefix}"
        raise MegaliteError(f"{head}: {parent} is a file, not a directory, so nothing can be "
                            f"written under it")


def _map_file(path: str) -> mmap.mmap | None:
    """A read-only map of the whole file; None for an empty file (which cannot be mapped)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return None
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _pair_chunks(m: int) -> Iterable[tuple[int, int]]:
    """Bounds ``[lo, hi)`` covering an m-element array in chunks that overlap by one element, so
    that ``np.diff`` over each chunk sees every adjacent pair exactly once."""
    for lo in range(0, m - 1, _CHUNK):
        yield lo, min(m, lo + _CHUNK + 1)


class IndexedDataset:
    """Read-only, zero-copy view of one MMIDIDX dataset.

    Attributes (all memory-mapped, never copied):
      ``sequence_lengths``  int32 ``[sequence_count]``: tokens per sequence.
      ``sequence_pointers`` int64 ``[sequence_count]``: byte offset of each sequence in ``.bin``.
      ``document_indices``  int64 ``[document_count]``: ``[0, ..., sequence_count]``; document d is
                            sequences ``[document_indices[d], document_indices[d + 1])``.
      ``sequence_modes``    int8 ``[sequence_count]`` when opened with ``multimodal=True``, else None.

    ``multimodal`` must match how the files were built: nothing in the header says so.
    """

    def __init__(self, prefix: str, multimodal: bool = False):
        self.prefix = str(prefix)
        self.multimodal = bool(multimodal)
        self._open(deep=True)

    # -- opening and validation -------------------------------------------------------------------

    def _open(self, deep: bool) -> None:
        idx_path, bin_path = index_file_path(self.prefix), data_file_path(self.prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise DataFormatError(f"{path}: missing (dataset prefix {self.prefix!r} needs both .idx and .bin)")
        try:
            self._idx_map = _map_file(idx_path)
            self._bin_map = _map_file(bin_path)
        except OSError as e:
            raise DataFormatError(f"cannot open dataset {self.prefix!r}: {e}") from e
        self._parse_index(idx_path)
        self._check_bin(bin_path, deep)
        if deep:
            self._check_arrays(idx_path)

    def _parse_index(self, path: str) -> None:
        buf = self._idx_map if self._idx_map is not None else b""
        size = len(buf)
        if size < _HEADER_BYTES:
            raise DataFormatError(f"{path}: truncated header ({size} bytes, need {_HEADER_BYTES})")
        if buf[:9] != _MAGIC:
            raise DataFormatError(f"{path}: not an MMIDIDX index (magic {bytes(buf[:9])!r}, expected {_MAGIC!r})")
        version = int(np.frombuffer(buf, "<u8", 1, 9)[0])
        if version != _VERSION:
            raise DataFormatError(f"{path}: unsupported version {version} (only {_VERSION} is supported)")
        code = buf[17]
        if code not in CODE_TO_DTYPE:
            raise DataFormatError(f"{path}: unknown dtype code {code} (known: {sorted(CODE_TO_DTYPE)})")
        self.dtype = CODE_TO_DTYPE[code]
        n, d = (int(v) for v in np.frombuffer(buf, "<u8", 2, 18))
        # Python ints: absurd counts from a corrupt header cannot overflow the size arithmetic.
        expected = _HEADER_BYTES + n * (4 + 8) + d * 8 + (n if self.multimodal else 0)
        if size < expected:
            raise DataFormatError(
                f"{path}: truncated: the header promises {n} sequences and {d} document-index entries "
                f"({expected} bytes{' with modes' if self.multimodal else ''}) but the file has {size} bytes")
        if size > expected:
            hint = (" (is it a multimodal dataset? open it with multimodal=True)"
                    if not self.multimodal and size - expected == n and n > 0 else "")
            raise DataFormatError(f"{path}: {size - expected} bytes of trailing garbage after the "
                                  f"index arrays ({expected} bytes expected){hint}")
        if d < 1:
            raise DataFormatError(f"{path}: empty document index (it must hold at least [0])")
        off = _HEADER_BYTES
        self.sequence_lengths = np.frombuffer(buf, "<i4", n, off)
        off += 4 * n
        self.sequence_pointers = np.frombuffer(buf, "<i8", n, off)
        off += 8 * n
        self.document_indices = np.frombuffer(buf, "<i8", d, off)
        off += 8 * d
        self.sequence_modes = np.frombuffer(buf, np.int8, n, off) if self.multimodal else None

    def _check_bin(self, path: str, deep: bool) -> None:
        n, itemsize = len(self.sequence_lengths), self.dtype.itemsize
        if deep:
            if n and int(self.sequence_lengths.min()) < 0:
                bad = int(np.argmax(self.sequence_lengths < 0))
                raise DataFormatError(f"{index_file_path(self.prefix)}: sequence {bad} has negative length "
                                      f"{int(self.sequence_lengths[bad])}")
            tokens = int(self.sequence_lengths.sum(dtype=np.int64))
        else:  # pointers were validated when first opened: the last one gives the total
            tokens = (int(self.sequence_pointers[-1]) // itemsize + int(self.sequence_lengths[-1])) if n else 0
        size = len(self._bin_map) if self._bin_map is not None else 0
        if size != tokens * itemsize:
            raise DataFormatError(f"{path}: {size} bytes, but the index describes {tokens} tokens of "
                                  f"{self.dtype} ({tokens * itemsize} bytes); truncated or mismatched .bin")
        self._num_tokens = tokens
        self._tokens = (np.frombuffer(self._bin_map, self.dtype) if self._bin_map is not None
                        else np.empty(0, self.dtype))

    def _check_arrays(self, path: str) -> None:
        """Pointers are the running sum of length x itemsize; the document index runs 0..n, sorted."""
        lengths, pointers, docs = self.sequence_lengths, self.sequence_pointers, self.document_indices
        n, itemsize = len(lengths), self.dtype.itemsize
        if n and int(pointers[0]) != 0:
            raise DataFormatError(f"{path}: sequence pointers must start at 0, got {int(pointers[0])}")
        for lo, hi in _pair_chunks(n):
            step = np.diff(pointers[lo:hi]) != lengths[lo:hi - 1].astype(np.int64) * itemsize
            if step.any():
                i = lo + int(np.argmax(step)) + 1
                raise DataFormatError(
                    f"{path}: sequence pointer {i} is {int(pointers[i])}, inconsistent with the lengths "
                    f"(expected {int(pointers[i - 1]) + int(lengths[i - 1]) * itemsize})")
        if int(docs[0]) != 0:
            raise DataFormatError(f"{path}: document index must start at 0, got {int(docs[0])}")
        if int(docs[-1]) != n:
            raise DataFormatError(f"{path}: document index must end at sequence_count {n}, got {int(docs[-1])}")
        for lo, hi in _pair_chunks(len(docs)):
            down = np.diff(docs[lo:hi]) < 0
            if down.any():
                i = lo + int(np.argmax(down)) + 1
                raise DataFormatError(f"{path}: document index decreases at entry {i} "
                                      f"({int(docs[i - 1])} -> {int(docs[i])})")

    # Pickling (e.g. into DataLoader workers) re-maps the files instead of copying the arrays;
    # the full validation already ran in the process that opened the dataset first.
    def __getstate__(self):
        return {"prefix": self.prefix, "multimodal": self.multimodal}

    def __setstate__(self, state):
        self.prefix, self.multimodal = state["prefix"], state["multimodal"]
        self._open(deep=False)

    # -- reading ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def _seq(self, i: int) -> int:
        n = len(self.sequence_lengths)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence {i} out of range for {self.prefix} ({n} sequences)")
        return i

    def __getitem__(self, i):
        """Tokens of sequence ``i`` (a read-only view of length ``sequence_lengths[i]``);
        a slice of sequence ids gives a list of such views."""
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = self._seq(i)
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize
        return self._tokens[start:start + int(self.sequence_lengths[i])]

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``i`` (to its end if ``length`` is None);
        a read-only view. The range must lie inside the sequence."""
        i = self._seq(i)
        size = int(self.sequence_lengths[i])
        offset = int(offset)
        length = size - offset if length is None else int(length)
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens [{offset}, {offset + length}) out of range for sequence {i} "
                             f"of {self.prefix} ({size} tokens)")
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize + offset
        return self._tokens[start:start + length]

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    def document(self, d: int) -> np.ndarray:
        """All tokens of document ``d``: its sequences are adjacent in ``.bin``, so this is one view."""
        n = self.num_documents
        d = int(d)
        if d < 0:
            d += n
        if not 0 <= d < n:
            raise IndexError(f"document {d} out of range for {self.prefix} ({n} documents)")
        first, end = int(self.document_indices[d]), int(self.document_indices[d + 1])
        if first == end:
            return self._tokens[:0]
        itemsize = self.dtype.itemsize
        start = int(self.sequence_pointers[first]) // itemsize
        stop = int(self.sequence_pointers[end - 1]) // itemsize + int(self.sequence_lengths[end - 1])
        return self._tokens[start:stop]

    def document_sequences(self, d: int) -> range:
        """The sequence ids of document ``d``."""
        return range(int(self.document_indices[d]), int(self.document_indices[d + 1]))

    def __repr__(self) -> str:
        return (f"IndexedDataset({self.prefix!r}, dtype={self.dtype}, sequences={len(self)}, "
                f"documents={self.num_documents}, tokens={self.num_tokens})")


def _token_array(tokens, prefix: str) -> np.ndarray:
    """A 1-D, contiguous integer array over ``tokens`` (no copy when it already is one)."""
    try:
        arr = np.asarray(tokens)
    except (TypeError, ValueError, RuntimeError) as e:  # ragged lists, GPU tensors, ...
        raise DataFormatError(f"{prefix}: tokens must be a 1-D integer array: {e}") from None
    if arr.size == 0 and arr.dtype.kind == "f":
        arr = arr.astype(np.int64)  # np.asarray([]) is float64
    if arr.dtype.kind not in "iu":
        raise DataFormatError(f"{prefix}: token ids must be integers, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise DataFormatError(f"{prefix}: tokens must be 1-D, got shape {arr.shape}")
    return np.ascontiguousarray(arr)


class IndexedDatasetBuilder:
    """Writes ``PREFIX.bin``/``PREFIX.idx`` atomically (temporary names, renamed by :meth:`finalize`).

    As a context manager, leaving the block by an exception aborts (removes the temporaries and
    leaves any older dataset at ``prefix`` untouched); leaving it normally does *not* finalize:
    call :meth:`finalize` inside the block. An unfinalized builder that is garbage-collected also
    removes its temporaries. Errors in the input raise :class:`DataFormatError` and leave the
    builder unchanged; write errors raise :class:`MegaliteError` and the builder must be aborted.
    """

    def __init__(self, prefix: str, dtype: np.dtype, multimodal: bool = False):
        from megalite import _C

        self.prefix = str(prefix)
        try:
            self.dtype = np.dtype(dtype)
        except TypeError:
            self.dtype = None
        if self.dtype not in DTYPE_TO_CODE:
            raise DataFormatError(f"unsupported token dtype {dtype!r} for {self.prefix} "
                                  f"(supported: {', '.join(str(t) for t in DTYPE_TO_CODE)})")
        self.multimodal = bool(multimodal)
        # Same directory as the targets so that the final rename is atomic; the suffix is unique
        # per builder, so concurrent writers never share a temporary.
        tag = f".tmp-{os.getpid()}-{secrets.token_hex(4)}"  # see remove_stale_temporaries
        check_output_parent(self.prefix)
        self._tmp_bin = data_file_path(self.prefix) + tag
        self._tmp_idx = index_file_path(self.prefix) + tag
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.prefix)), exist_ok=True)
            self._impl = _C.IndexedDatasetBuilder(self._tmp_bin, self._tmp_idx, DTYPE_TO_CODE[self.dtype],
                                                  self.multimodal)
        except OSError as e:
            raise MegaliteError(f"cannot write dataset {self.prefix}: {e}") from e

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except (ValueError, TypeError) as e:  # TypeError: e.g. a mode that is no C int at all
            raise DataFormatError(f"{self.prefix}: {e}") from None
        except OSError as e:
            raise MegaliteError(f"cannot write dataset {self.prefix}: {e}") from e
        except RuntimeError as e:
            raise MegaliteError(f"{self.prefix}: {e}") from None

    def add_document(self, tokens, sentence_lengths: Sequence[int] | None = None, mode=0) -> None:
        """Appends one document and ends it. ``tokens``: 1-D ints (list, numpy, CPU torch tensor).
        ``sentence_lengths`` splits it into sequences (must sum to ``len(tokens)``); None makes the
        whole document one sequence. ``mode``: one int8 for all sequences, or one per sequence
        (multimodal builders only; otherwise it must be 0)."""
        lengths = None if sentence_lengths is None else [int(x) for x in sentence_lengths]
        modes = int(mode) if isinstance(mode, (int, np.integer)) else [int(m) for m in mode]
        self._call(self._impl.add_document, _token_array(tokens, self.prefix), lengths, modes)

    def add_documents(self, tokens, document_lengths: Sequence[int], mode: int = 0) -> None:
        """Appends ``len(document_lengths)`` whole documents (one sequence each) in one call:
        ``tokens`` is their concatenation. Same bytes as calling :meth:`add_document` per document,
        without the per-call overhead. No document may be open."""
        lengths = np.asarray(document_lengths)
        if lengths.size == 0:
            lengths = lengths.astype(np.int64)
        if lengths.ndim != 1 or lengths.dtype.kind not in "iu":
            raise DataFormatError(f"{self.prefix}: document lengths must be a 1-D integer sequence")
        self._call(self._impl.add_documents, _token_array(tokens, self.prefix),
                   np.ascontiguousarray(lengths, dtype=np.int64), int(mode))

    def add_item(self, tokens, mode: int = 0) -> None:
        """Appends one sequence; the document stays open until :meth:`end_document`."""
        self._call(self._impl.add_item, _token_array(tokens, self.prefix), int(mode))

    def end_document(self) -> None:
        self._call(self._impl.end_document)

    def add_index(self, prefix: str) -> None:
        """Appends every document of the dataset at ``prefix`` (validated; its dtype must match)."""
        self._add_dataset(IndexedDataset(prefix, multimodal=self.multimodal))

    def _add_dataset(self, other: IndexedDataset) -> None:
        if other.dtype != self.dtype:
            raise DataFormatError(f"{index_file_path(other.prefix)}: dtype {other.dtype} does not match the "
                                  f"dataset being built ({self.prefix}, {self.dtype})")
        if other.multimodal != self.multimodal:
            raise DataFormatError(f"{index_file_path(other.prefix)}: multimodal={other.multimodal} does not "
                                  f"match the dataset being built ({self.prefix}, multimodal={self.multimodal})")
        self._call(self._impl.add_index, data_file_path(other.prefix), other.sequence_lengths,
                   other.document_indices, other.sequence_modes)

    @property
    def sequence_count(self) -> int:
        return self._impl.sequence_count

    @property
    def document_count(self) -> int:
        return self._impl.document_count

    @property
    def num_tokens(self) -> int:
        return self._impl.num_tokens

    def finalize(self) -> None:
        """Ends an open document, writes the index, and renames ``.bin`` then ``.idx`` into place
        (a reader never sees a new ``.idx`` without its ``.bin``)."""
        self._call(self._impl.finalize)
        try:
            os.replace(self._tmp_bin, data_file_path(self.prefix))
            os.replace(self._tmp_idx, index_file_path(self.prefix))
        except OSError as e:
            for path in (self._tmp_bin, self._tmp_idx):
                if os.path.exists(path):
                    os.unlink(path)
            raise MegaliteError(f"cannot move dataset {self.prefix} into place: {e}") from e
        _sync_dir(os.path.dirname(os.path.abspath(self.prefix)))

    def abort(self) -> None:
        """Removes the temporaries (no-op after :meth:`finalize`)."""
        self._impl.abort()

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except (OverflowError, OSError):  # not a possible pid
        return False
    return True


def remove_stale_temporaries(prefix) -> list[str]:
    """Removes ``PREFIX.bin.tmp-PID-*`` / ``PREFIX.idx.tmp-PID-*`` left by a builder whose process
    died without cleaning up (``kill -9``, a node failure); returns the paths removed.

    Only this exact prefix's temporaries are touched, and only those whose PID is no live process
    on this machine (a running writer keeps its files; a reused PID errs on the side of keeping).
    """
    prefix = str(prefix)
    directory = os.path.dirname(os.path.abspath(prefix))
    pattern = re.compile(re.escape(os.path.basename(prefix)) + r"\.(?:bin|idx)\.tmp-(\d+)-[0-9a-f]+")
    try:
        names = os.listdir(directory)
    except OSError:  # no directory yet: nothing stale
        return []
    removed = []
    for name in sorted(names):
        m = pattern.fullmatch(name)
        if m and not _pid_alive(int(m.group(1))):
            path = os.path.join(directory, name)
            try:
                os.unlink(path)
            except FileNotFoundError:  # another run cleaned it first
                continue
            except OSError as e:
                raise MegaliteError(f"cannot remove the stale temporary {path}: {e}") from e
            removed.append(path)
    return removed


def _sync_dir(path: str) -> None:
    """Makes the renames durable; best effort (some filesystems refuse fsync on directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def merge_datasets(prefixes: list[str], output_prefix: str, multimodal: bool = False) -> None:
    """Concatenates datasets (in order) into ``output_prefix``; all must share one dtype.

    The output equals building all their documents at once, byte for byte. Every input is
    validated before anything is written; the output appears only when complete.
    """
    prefixes = [str(p) for p in prefixes]
    if not prefixes:
        raise MegaliteError("merge_datasets: no input datasets given")
    datasets = [IndexedDataset(p, multimodal=multimodal) for p in prefixes]
    first = datasets[0]
    for p, ds in zip(prefixes[1:], datasets[1:]):
        if ds.dtype != first.dtype:
            raise DataFormatError(f"cannot merge {index_file_path(p)} (dtype {ds.dtype}) with "
                                  f"{index_file_path(prefixes[0])} (dtype {first.dtype}): dtypes must agree")
    with IndexedDatasetBuilder(output_prefix, first.dtype, multimodal=multimodal) as builder:
        for ds in datasets:
            builder._add_dataset(ds)
        builder.finalize()
