"""Streaming tensor I/O for conversion: safetensors written one tensor at a time, Hugging Face
model directories read lazily and written in shards.

Why a streaming writer: ``safetensors.torch.save_file`` needs every tensor of a file in memory at
once, so a 7B model converted into one file (or one pipeline stage of it) would need the whole
model resident. The format is simple (an 8-byte little-endian header length, a JSON header with
each tensor's dtype, shape and byte range, then the raw little-endian bytes), and all shapes are
known before the first byte is written (they are computed on the ``meta`` device), so
:class:`StreamingSafetensorsWriter` writes the header first and then each tensor as it is
produced. Files it writes are read back by ``safetensors.safe_open`` (the tests do).

Peak memory of a conversion is then one full tensor (plus its converted copies), never a file.
"""
from __future__ import annotations

import json
import os
import struct
import sys
from typing import Any

import torch
from safetensors import safe_open

from megalite.errors import MegaliteError

__all__ = ["StreamingSafetensorsWriter", "HFReader", "HFShardedWriter", "progress",
           "SAFETENSORS_DTYPES"]

SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
                      torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32",
                      torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL"}
HF_SINGLE = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"


def progress(total: int, desc: str):
    """A progress bar on stderr (tqdm), counting tensors."""
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, mininterval=1.0)


class StreamingSafetensorsWriter:
    """Write one safetensors file tensor by tensor, in the order of ``specs``.

    Args:
        path: the file to write (the caller writes into a temporary directory).
        specs: ``[(name, dtype, shape), ...]``: every tensor the file will hold, in write order.
        metadata: the header's ``__metadata__`` (strings only).

    Use :meth:`write` once per spec, in order, then :meth:`close` (or a ``with`` block), which
    checks that every tensor was written.
    """

    def __init__(self, path: str, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self.expected: list[tuple[str, torch.dtype, tuple[int, ...], int]] = []
        offset = 0
        for name, dtype, shape in specs:
            if dtype not in SAFETENSORS_DTYPES:
                raise MegaliteError(f"{name}: dtype {dtype} cannot be stored in safetensors")
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self.expected.append((name, dtype, tuple(shape), nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)        # the format pads the header to 8-byte alignment
        self.path = path
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(raw)))
        self.f.write(raw)
        self.next = 0
        self.nbytes = offset

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor (must be the next spec's name, dtype and shape)."""
        if self.next >= len(self.expected):
            raise MegaliteError(f"{self.path}: unexpected extra tensor {name}")
        exp_name, dtype, shape, nbytes = self.expected[self.next]
        if name != exp_name or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise MegaliteError(f"{self.path}: expected {exp_name} {dtype} {list(shape)}, got "
                                f"{name} {tensor.dtype} {list(tensor.shape)}")
        data = tensor.detach().cpu().contiguous().reshape(-1)
        if nbytes:
            # Byte view without a copy (the machine is little-endian, as the format).
            self.f.write(memoryview(data.view(torch.uint8).numpy()))
        self.next += 1

    def close(self) -> None:
        """Flush and fsync; MegaliteError if tensors are missing."""
        if self.f.closed:
            return
        missing = [e[0] for e in self.expected[self.next:]]
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        if missing:
            raise MegaliteError(f"{self.path}: {len(missing)} tensor(s) never written: "
                                f"{missing[:4]}")

    def __enter__(self) -> "StreamingSafetensorsWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        elif not self.f.closed:
            self.f.close()


class HFReader:
    """A Hugging Face model directory, read lazily: ``config.json`` and safetensors weights
    (one ``model.safetensors`` or shards listed in ``model.safetensors.index.json``).

    Nothing is executed from the directory: the config is parsed by ``transformers``'
    ``AutoConfig`` without remote code, tensors come from safetensors memory maps.
    """

    def __init__(self, directory: str):
        if not os.path.isdir(directory):
            raise MegaliteError(f"--load {directory}: no such directory")
        self.directory = directory
        cfg_path = os.path.join(directory, "config.json")
        if not os.path.isfile(cfg_path):
            raise MegaliteError(f"{directory} is not a Hugging Face model directory (no "
                                f"config.json)")
        from transformers import AutoConfig
        try:
            self.config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
        except Exception as e:   # ValueError (unknown model_type), OSError, JSON errors
            raise MegaliteError(f"{cfg_path}: cannot read the model config: "
                                f"{type(e).__name__}: {e}") from None
        self.file_of: dict[str, str] = {}
        index = os.path.join(directory, HF_INDEX)
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise MegaliteError(f"{index} is unreadable: {e}") from None
            self.file_of = {k: os.path.join(directory, v) for k, v in weight_map.items()}
        elif os.path.isfile(os.path.join(directory, HF_SINGLE)):
            single = os.path.join(directory, HF_SINGLE)
            with self._open(single) as h:
                self.file_of = {k: single for k in h.keys()}
        else:
            found = sorted(os.listdir(directory))
            raise MegaliteError(f"{directory} holds no safetensors weights ({HF_SINGLE} or "
                                f"{HF_INDEX}); found {found[:8]}. PyTorch .bin weights are not "
                                f"read (they are pickles): re-save them with safetensors")
        self.handles: dict[str, Any] = {}

    @staticmethod
    def _open(path: str):
        try:
            return safe_open(path, framework="pt", device="cpu")
        except Exception as e:
            raise MegaliteError(f"{path} is not a readable safetensors file: {e}") from None

    def names(self) -> list[str]:
        """Every tensor name in the directory."""
        return list(self.file_of)

    def get(self, name: str) -> torch.Tensor:
        """One tensor (memory mapped read)."""
        path = self.file_of.get(name)
        if path is None:
            raise MegaliteError(f"{self.directory} has no tensor {name!r}")
        if path not in self.handles:
            if not os.path.isfile(path):
                raise MegaliteError(f"{path} (listed in {HF_INDEX}) is missing")
            self.handles[path] = self._open(path).__enter__()
        try:
            return self.handles[path].get_tensor(name)
        except Exception as e:
            raise MegaliteError(f"{path}: cannot read tensor {name!r}: {e}") from None

    def meta_tensor(self, name: str) -> torch.Tensor:
        """An empty tensor on the meta device with the stored dtype and shape (no data read)."""
        path = self.file_of[name]
        if path not in self.handles:
            self.handles[path] = self._open(path).__enter__()
        sl = self.handles[path].get_slice(name)
        dtype = {v: k for k, v in SAFETENSORS_DTYPES.items()}.get(sl.get_dtype())
        if dtype is None:
            raise MegaliteError(f"{path}: tensor {name!r} has dtype {sl.get_dtype()}, which "
                                f"megalite does not convert")
        return torch.empty(sl.get_shape(), dtype=dtype, device="meta")

    def close(self) -> None:
        for h in self.handles.values():
            h.__exit__(None, None, None)
        self.handles.clear()


class HFShardedWriter:
    """Write a Hugging Face weights set as safetensors shards of at most ``max_shard_bytes``
    (one ``model.safetensors`` when it fits, else ``model-0000i-of-0000n.safetensors`` plus
    ``model.safetensors.index.json``), tensor by tensor in the order of ``specs``."""

    def __init__(self, directory: str, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 max_shard_bytes: int):
        self.directory = directory
        groups: list[list] = [[]]
        size = 0
        for spec in specs:
            n = torch.Size(spec[2]).numel() * torch.empty((), dtype=spec[1]).element_size()
            if groups[-1] and size + n > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(spec)
            size += n
        count = len(groups)
        self.names = ([HF_SINGLE] if count == 1 else
                      [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
        self.groups = groups
        self.file_of = {s[0]: i for i, g in enumerate(groups) for s in g}
        self.total = sum(torch.Size(s[2]).numel() * torch.empty((), dtype=s[1]).element_size()
                         for s in specs)
        self.current: StreamingSafetensorsWriter | None = None
        self.current_index = -1

    def write(self, name: str, tensor: torch.Tensor) -> None:
        i = self.file_of[name]
        if i != self.current_index:
            if self.current is not None:
                self.current.close()
            self.current = StreamingSafetensorsWriter(
                os.path.join(self.directory, self.names[i]), self.groups[i], {"format": "pt"})
            self.current_index = i
        self.current.write(name, tensor)

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
        if len(self.names) > 1:
            with open(os.path.join(self.directory, HF_INDEX), "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": self.total},
                           "weight_map": {n: self.names[i] for n, i in self.file_of.items()}},
                          f, indent=2, sort_keys=True)
