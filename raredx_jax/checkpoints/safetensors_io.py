"""A minimal safetensors reader/writer over numpy memmaps.

Why not `safetensors.numpy`: it cannot hold bfloat16, and we want lazy, slice-wise reads so a sharded import
touches only the bytes each device needs. The format is tiny (u64 header length, JSON header, raw bytes), and
it never executes code from the file (no pickle).
"""
from __future__ import annotations

import json
import os
import struct
from typing import Iterable

import ml_dtypes
import numpy as np

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
           "U16": np.uint16, "U32": np.uint32, "U64": np.uint64,
           "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
MAX_HEADER_BYTES = 100 << 20  # the format's own limit (safetensors refuses larger headers too)


class CheckpointFormatError(ValueError):
    """A weights file that is truncated, corrupt, or in a refused format (pickle). One line naming the file and,
    where there is one, the tensor; the CLIs print it and exit 2."""


class SafetensorsFile:
    """Lazy view of one .safetensors file: `get(name)` returns a read-only memmap-backed array.

    The header is validated against the file on open (before any tensor is read): the 8-byte length, the JSON
    header, each tensor's dtype, shape and `data_offsets` (inside the data section, the size its dtype and shape
    need, no overlap). Why: a truncated download otherwise surfaced as `cannot reshape array of size 0 into
    shape (256,)` from deep inside the import, naming neither the file nor the tensor.
    """

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                raw = f.read(8)
                if len(raw) != 8:
                    raise CheckpointFormatError(f"{path}: truncated safetensors file ({size} bytes, no 8-byte "
                                                "header length)")
                (n,) = struct.unpack("<Q", raw)
                if n > MAX_HEADER_BYTES or 8 + n > size:
                    raise CheckpointFormatError(
                        f"{path}: not a valid safetensors file: header length {n} exceeds the file size of {size} "
                        "bytes (truncated, or another format such as a pickle)")
                blob = f.read(n)
        except OSError as e:
            raise CheckpointFormatError(f"{path}: cannot read ({e.strerror or e})") from None
        try:
            header = json.loads(blob.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointFormatError(f"{path}: corrupt safetensors header ({reason})") from None
        if not isinstance(header, dict):
            raise CheckpointFormatError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, "
                                        "expected an object)")
        meta = header.pop("__metadata__", {}) or {}
        self.metadata = meta if isinstance(meta, dict) else {}
        self.header = header
        self._offset = 8 + n
        self._check(size - self._offset)
        self._mm: np.memmap | None = None

    def _check(self, data_bytes: int) -> None:
        spans, overrun = [], []
        for name, info in self.header.items():
            where = f"{self.path}: tensor {name!r}"
            if not isinstance(info, dict):
                raise CheckpointFormatError(f"{where}: corrupt header entry")
            dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
            if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
                raise CheckpointFormatError(f"{where}: corrupt header entry (shape {shape!r})")
            if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)
                    and 0 <= offs[0] <= offs[1]):
                raise CheckpointFormatError(f"{where}: corrupt header entry (data_offsets {offs!r})")
            if not isinstance(dtype, str):
                raise CheckpointFormatError(f"{where}: corrupt header entry (dtype {dtype!r})")
            if offs[1] > data_bytes:
                overrun.append((offs[0], name, offs))
                continue
            if dtype in _DTYPES:
                want = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dtype]).itemsize
                if offs[1] - offs[0] != want:
                    raise CheckpointFormatError(
                        f"{where}: holds {offs[1] - offs[0]} bytes, but dtype {dtype} and shape {tuple(shape)} need "
                        f"{want}: the file is corrupt")
            spans.append((offs[0], offs[1], name))
        if overrun:  # name the tensor the file is cut in (the first one past the end)
            _, name, offs = min(overrun)
            raise CheckpointFormatError(
                f"{self.path}: tensor {name!r}: data_offsets {offs} run past the end of the file (its data section "
                f"holds {data_bytes} bytes): the file is truncated or corrupt")
        spans.sort()
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:
                raise CheckpointFormatError(f"{self.path}: tensors {a!r} and {b!r} overlap in the file: the header "
                                            "is corrupt")

    def keys(self) -> list[str]:
        return list(self.header)

    def _map(self) -> np.memmap:
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._mm

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        if info["dtype"] not in _DTYPES:
            raise CheckpointFormatError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        if start == end:  # np.memmap cannot map an empty slice
            return np.zeros(info["shape"], _DTYPES[info["dtype"]])
        buf = self._map()[self._offset + start:self._offset + end]
        if buf.size != end - start:  # the file shrank after it was opened
            raise CheckpointFormatError(f"{self.path}: tensor {name!r}: the file was truncated while being read")
        return buf.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


def write_safetensors(path: str, tensors: Iterable[tuple[str, np.ndarray]],
                      metadata: dict[str, str] | None = None) -> None:
    """Write tensors (in the given order) atomically: a temp file renamed into place."""
    items = [(k, np.ascontiguousarray(v)) for k, v in tensors]
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, arr in items:
        if arr.dtype not in _NAMES:
            raise CheckpointFormatError(f"{path}: tensor {name!r} has unsupported dtype {arr.dtype}")
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, arr in items:
            f.write(arr.tobytes())
    os.replace(tmp, path)
