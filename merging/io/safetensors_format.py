"""Reading and writing the safetensors format ourselves, so that

* a header can be validated from its first bytes (ranged reads, before any large download);
* tensors are read with ``readinto`` into fresh buffers, not memory-mapped: the merge's RSS
  then holds only the tensors in flight, not every page of every checkpoint it touched;
* output shards are written tensor by tensor at precomputed offsets, with no shard buffered.
"""
from __future__ import annotations

import dataclasses
import json
import math
import struct
from dataclasses import dataclass

import torch

from merging.errors import CorruptCheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorMeta:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: str  # the file (local path or URI) holding the data
    start: int  # absolute byte offset in the file
    nbytes: int

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]


def header_length(prefix: bytes, where: str, file_size: int | None) -> int:
    if len(prefix) < 8:
        raise CorruptCheckpointError(f"{where}: not a safetensors file (truncated: {len(prefix)} bytes)")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n == 0 or n > MAX_HEADER or (file_size is not None and 8 + n > file_size):
        raise CorruptCheckpointError(f"{where}: not a safetensors file or truncated (header length {n}, file size {file_size})")
    return n


def parse_header(raw: bytes, where: str, file_size: int | None) -> tuple[dict[str, TensorMeta], dict[str, str]]:
    """Validate a safetensors header; return ``(tensor metas, __metadata__)``.

    ``raw`` starts at byte 0 of the file and holds at least the whole header.
    """
    n = header_length(raw, where, file_size)
    if len(raw) < 8 + n:
        raise CorruptCheckpointError(f"{where}: truncated safetensors header")
    try:
        header = json.loads(raw[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"{where}: corrupt safetensors header ({e.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{where}: corrupt safetensors header (not an object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CorruptCheckpointError(f"{where}: corrupt safetensors header (__metadata__ is not an object)")
    metas: dict[str, TensorMeta] = {}
    data_end = 0
    for key, info in header.items():
        try:
            dtype_name, raw_shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            if not isinstance(dtype_name, str) or not isinstance(raw_shape, list) \
                    or not all(_is_int(x) for x in (*raw_shape, start, end)):
                raise TypeError
            shape = tuple(int(x) for x in raw_shape)
        except (KeyError, TypeError, ValueError):
            raise CorruptCheckpointError(f"{where}: corrupt header entry for tensor {key!r}") from None
        if dtype_name not in DTYPES:
            raise CorruptCheckpointError(f"{where}: tensor {key!r} has unsupported dtype {dtype_name!r}")
        dtype = DTYPES[dtype_name]
        expected = math.prod(shape) * dtype.itemsize
        if any(d < 0 for d in shape) or start < 0 or end - start != expected:
            raise CorruptCheckpointError(f"{where}: tensor {key!r} has inconsistent offsets {start}..{end} for shape {list(shape)} {dtype_name}")
        metas[key] = TensorMeta(key, dtype, shape, where, 8 + n + start, expected)
        data_end = max(data_end, end)
    if file_size is not None and 8 + n + data_end > file_size:
        raise CorruptCheckpointError(f"{where}: truncated: header promises {8 + n + data_end} bytes, file has {file_size}")
    return metas, {str(k): str(v) for k, v in metadata.items()}


def rows_of(meta: TensorMeta, start: int, stop: int) -> TensorMeta:
    """The metadata of rows ``[start, stop)`` of a tensor (its first dimension): for a row-major
    tensor, one contiguous byte range inside the tensor's own."""
    if not meta.shape or not 0 <= start <= stop <= meta.shape[0]:
        raise ValueError(f"rows {start}..{stop} out of range for tensor {meta.key!r} of shape {list(meta.shape)}")
    row_bytes = math.prod(meta.shape[1:]) * meta.dtype.itemsize
    return dataclasses.replace(meta, shape=(stop - start, *meta.shape[1:]), start=meta.start + start * row_bytes,
                               nbytes=(stop - start) * row_bytes)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_tensor(f, meta: TensorMeta, out: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor from an open binary file object into fresh memory, or into ``out`` (a
    contiguous CPU tensor of the same dtype and shape: saves a copy when the caller has the
    final buffer already).

    The buffer is an uninitialised torch tensor (no zero-fill), filled with ``readinto`` in a
    loop: one read() returns at most ~2 GiB on Linux, and large tensors exceed that.
    """
    if meta.nbytes == 0:
        return torch.empty(meta.shape, dtype=meta.dtype) if out is None else out
    if out is not None:
        assert out.is_contiguous() and out.dtype == meta.dtype and tuple(out.shape) == meta.shape and out.device.type == "cpu"
    raw = torch.empty(meta.nbytes, dtype=torch.uint8) if out is None else out.reshape(-1).view(torch.uint8)
    view = memoryview(raw.numpy()).cast("B")
    f.seek(meta.start)
    got = 0
    while got < meta.nbytes:
        n = f.readinto(view[got:]) if hasattr(f, "readinto") else _read_into(f, view[got:])
        if not n:
            break
        got += n
    if got != meta.nbytes:
        raise CorruptCheckpointError(f"{meta.file}: truncated while reading tensor {meta.key!r}")
    return raw.view(meta.dtype).reshape(meta.shape) if out is None else out


def _read_into(f, buf: memoryview) -> int:
    data = f.read(len(buf))
    buf[: len(data)] = data
    return len(data)


def build_header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None = None) -> tuple[bytes, dict[str, int]]:
    """Header bytes (length prefix included, padded to 8) and each key's absolute data offset."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    rel: dict[str, int] = {}
    for key, dtype, shape in entries:
        size = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        rel[key] = offset
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    prefix = struct.pack("<Q", len(raw)) + raw
    return prefix, {k: len(prefix) + v for k, v in rel.items()}
