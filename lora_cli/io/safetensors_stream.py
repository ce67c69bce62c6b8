"""Write safetensors files tensor by tensor: peak memory stays near the largest tensor, not the file.

Every output tensor's dtype and shape is known up front, so a file is written as header + data in one pass,
under a temporary name, then renamed. Data is read with plain file reads rather than a memory map, so pages
of the whole file never count towards the process's memory, and tensors that are not transformed are copied
as bytes without being decoded.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from lora_cli.errors import LoraCliError
from lora_cli.io.atomic import atomic_path
from lora_cli.io.safetensors_file import read_header

Transform = Callable[[str, torch.Tensor], torch.Tensor]
ALIGN = 8
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


class TensorReader:
    """Reads single tensors (raw bytes or decoded) from an open safetensors file."""

    def __init__(self, path: Path, handle: BinaryIO, error: type[LoraCliError]) -> None:
        self.path, self._handle, self._error = path, handle, error
        self.header = read_header(path, error)
        self.metadata: dict[str, str] = self.header.pop("__metadata__", None) or {}
        self._data_start = 8 + struct.unpack("<Q", handle.read(8))[0]
        for name, entry in self.header.items():
            if not _valid_entry(entry):
                raise error(f"{path}: damaged safetensors header (entry {name} has impossible offsets or shape)")

    def names(self) -> list[str]:
        """Tensor names in file order."""
        return sorted(self.header, key=lambda name: self.header[name]["data_offsets"][0])

    def raw(self, name: str) -> bytes:
        begin, end = self.header[name]["data_offsets"]
        self._handle.seek(self._data_start + begin)
        raw = self._handle.read(end - begin)
        if len(raw) != end - begin:
            raise self._error(f"{self.path}: damaged safetensors file (tensor {name} is cut short)")
        return raw

    def tensor(self, name: str) -> torch.Tensor:
        entry = self.header[name]
        if entry["dtype"] not in DTYPES:
            raise self._error(f"{self.path}: tensor {name} has unsupported dtype {entry['dtype']}")
        dtype, shape = DTYPES[entry["dtype"]], entry["shape"]
        begin, end = entry["data_offsets"]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        buffer = bytearray(end - begin)
        self._handle.seek(self._data_start + begin)
        if self._handle.readinto(buffer) != end - begin:
            raise self._error(f"{self.path}: damaged safetensors file (tensor {name} is cut short)")
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)


@contextmanager
def open_readers(paths: list[Path], error: type[LoraCliError]) -> Iterator[list[TensorReader]]:
    with ExitStack() as stack:
        yield [TensorReader(path, stack.enter_context(open(path, "rb")), error) for path in paths]


def _valid_entry(entry: object) -> bool:
    """Offsets that are ordered, a shape of non-negative ints, and for dtypes torch knows, a size that matches."""
    try:
        begin, end = entry["data_offsets"]
        shape = [int(size) for size in entry["shape"]]
    except (KeyError, TypeError, ValueError):
        return False
    if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end) or min(shape, default=0) < 0:
        return False
    dtype = DTYPES.get(entry.get("dtype"))
    return dtype is None or end - begin == math.prod(shape) * dtype.itemsize


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of a file to be written: its header entry, its size and how to produce its bytes."""

    name: str
    dtype: str
    shape: list[int]
    produce: Callable[[], bytes | memoryview]
    size: int | None = None  # bytes; computed from dtype and shape when not given

    def nbytes(self) -> int:
        return self.size if self.size is not None else math.prod(self.shape) * DTYPES[self.dtype].itemsize


def write_streamed(target: Path, planned: list[PlannedTensor], metadata: dict[str, str]) -> None:
    """Write the planned tensors in order to `target` atomically; a produced size that differs is a bug."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for item in planned:
        header[item.name] = {"dtype": item.dtype, "shape": item.shape, "data_offsets": [offset, offset + item.nbytes()]}
        offset += item.nbytes()
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % ALIGN)
    with atomic_path(target) as tmp, open(tmp, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for item in planned:
            data = item.produce()
            if memoryview(data).nbytes != item.nbytes():
                raise ValueError(f"{item.name}: produced {memoryview(data).nbytes} bytes, planned {item.nbytes()}")
            out.write(data)


def stream_rewrite(
    source: Path,
    target: Path,
    transform: Transform,
    wanted: Callable[[str], bool],
    metadata: dict[str, str],
    error: type[LoraCliError],
) -> None:
    """Copy `source` to `target`, passing the `wanted` tensors through `transform` (the others are copied as
    bytes); metadata is merged into the header. A transform keeps each tensor's dtype and shape."""
    with open_readers([source], error) as (reader,):

        def produce(name: str) -> Callable[[], bytes | memoryview]:
            if not wanted(name):
                return lambda: reader.raw(name)
            return lambda: tensor_bytes(transform(name, reader.tensor(name)))

        planned = []
        for name in reader.names():
            entry = reader.header[name]
            begin, end = entry["data_offsets"]
            planned.append(PlannedTensor(name, entry["dtype"], entry["shape"], produce(name), size=end - begin))
        write_streamed(target, planned, {**reader.metadata, **metadata})


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy where it is already contiguous on the CPU."""
    tensor = tensor.detach().contiguous().cpu()
    if tensor.numel() == 0:
        return memoryview(b"")
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)
