"""Streaming reader and writer of the safetensors format.

The reader parses the header and reads each tensor's bytes straight into a destination tensor's storage
(``readinto``), so loading a checkpoint holds one copy of the weights, not two (no mmap, no intermediate buffer when
dtypes match). The writer streams tensors to disk one by one. Files are interchangeable with the ``safetensors``
library (tested).

Format: 8-byte little-endian header length N, N bytes of JSON ``{name: {dtype, shape, data_offsets: [begin, end]}}``
(offsets relative to the data section) with optional ``__metadata__``, then the raw little-endian data.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ola_model.errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    nbytes: int


class SafetensorsFile:
    """A safetensors file opened for reading tensor by tensor."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.entries: dict[str, TensorEntry] = {}
        self.metadata: dict[str, str] = {}
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise CheckpointError(f"{self.path}: too short to be a safetensors file")
                (n,) = struct.unpack("<Q", raw)
                if n > MAX_HEADER_BYTES or 8 + n > size:
                    raise CheckpointError(f"{self.path}: header length {n} is invalid for a {size}-byte file")
                header = json.loads(f.read(n))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{self.path}: cannot read safetensors header: {exc}") from exc
        data_start = 8 + n
        self.metadata = header.pop("__metadata__", None) or {}
        for name, info in header.items():
            if info.get("dtype") not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
            begin, end = info["data_offsets"]
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            numel = 1
            for d in shape:
                numel *= d
            nbytes = numel * dtype.itemsize
            if end - begin != nbytes or data_start + end > size:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} spans bytes {begin}..{end}, which does not fit shape {list(shape)} "
                    f"of {info['dtype']} or the file size {size} (truncated file?)"
                )
            self.entries[name] = TensorEntry(name, dtype, shape, data_start + begin, nbytes)

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Read tensor ``name`` into ``out`` (same shape; any dtype, converted if it differs; CPU)."""
        entry = self.entries[name]
        if tuple(out.shape) != entry.shape:
            raise CheckpointError(f"{self.path}: {name!r} has shape {list(entry.shape)}, destination {list(out.shape)}")
        direct = out.dtype == entry.dtype and out.is_contiguous() and out.device.type == "cpu"
        target = out if direct else torch.empty(entry.shape, dtype=entry.dtype)
        if entry.nbytes:
            buffer = target.view(-1).view(torch.uint8).numpy()  # the tensor's own storage, as bytes
            with open(self.path, "rb") as f:
                f.seek(entry.begin)
                if f.readinto(memoryview(buffer)) != entry.nbytes:
                    raise CheckpointError(f"{self.path}: unexpected end of file while reading {name!r}")
        if not direct:
            out.copy_(target)

    def read(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        out = torch.empty(entry.shape, dtype=entry.dtype)
        self.read_into(name, out)
        return out


def write_safetensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> int:
    """Write ``tensors`` (CPU or not; any layout) to ``path`` one tensor at a time. Returns the data bytes written."""
    header: dict[str, object] = {}
    offset = 0
    names = sorted(tensors)
    for name in names:
        t = tensors[name]
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((-len(blob)) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in names:
            t = tensors[name].detach()
            if t.numel():
                t = t.to("cpu").contiguous()
                f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
    return offset
