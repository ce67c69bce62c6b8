"""Rewrite a safetensors file tensor by tensor: peak memory stays near the largest tensor, not the file.

The output header is known up front (a transform keeps every tensor's dtype and shape), so the file is
written as header + data in one pass, under a temporary name, then renamed. Data is read with plain file
reads rather than a memory map, so pages of the whole file never count towards the process's memory, and
tensors that are not transformed are copied as bytes without being decoded.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

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


def stream_rewrite(
    source: Path,
    target: Path,
    transform: Transform,
    wanted: Callable[[str], bool],
    metadata: dict[str, str],
    error: type[LoraCliError],
) -> None:
    """Copy `source` to `target`, passing the `wanted` tensors through `transform` (the others are copied as
    bytes); metadata is merged into the header."""
    header = read_header(source, error)
    old_metadata = header.pop("__metadata__", None) or {}
    names = sorted(header, key=lambda name: header[name]["data_offsets"][0])
    out_header: dict = {"__metadata__": {**old_metadata, **metadata}}
    offset = 0
    for name in names:
        begin, end = header[name]["data_offsets"]
        out_header[name] = {
            "dtype": header[name]["dtype"],
            "shape": header[name]["shape"],
            "data_offsets": [offset, offset + end - begin],
        }
        offset += end - begin
    encoded = json.dumps(out_header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % ALIGN)
    with open(source, "rb") as reader:
        data_start = 8 + struct.unpack("<Q", reader.read(8))[0]
        with atomic_path(target) as tmp, open(tmp, "wb") as out:
            out.write(struct.pack("<Q", len(encoded)))
            out.write(encoded)
            for name in names:
                begin, end = header[name]["data_offsets"]
                reader.seek(data_start + begin)
                raw = reader.read(end - begin)
                if len(raw) != end - begin:
                    raise error(f"{source}: damaged safetensors file (tensor {name} is cut short)")
                if wanted(name):
                    raw = _transformed(name, raw, header[name], transform)
                out.write(raw)


def _transformed(name: str, raw: bytes, entry: dict, transform: Transform) -> bytes:
    dtype, shape = DTYPES[entry["dtype"]], entry["shape"]
    original = torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape) if raw else torch.empty(shape, dtype=dtype)
    tensor = transform(name, original)
    if tensor.dtype != original.dtype or tuple(tensor.shape) != tuple(original.shape):
        raise ValueError(f"transform changed {name}")  # a bug in the caller, not user input
    return _tensor_bytes(tensor)


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    tensor = tensor.detach().contiguous().cpu()
    if tensor.numel() == 0:
        return b""
    return tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
