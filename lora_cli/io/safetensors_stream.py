"""Rewrite a safetensors file tensor by tensor: peak memory stays near the largest tensor, not the file.

The output header is known up front (a transform keeps every tensor's dtype and shape), so the file is
written as header + data in one pass, under a temporary name, then renamed.
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


def stream_rewrite(
    source: Path, target: Path, transform: Transform, metadata: dict[str, str], error: type[LoraCliError]
) -> None:
    """Copy `source` to `target`, passing each tensor through `transform`; metadata is merged into the header."""
    from safetensors import safe_open

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
    with atomic_path(target) as tmp, open(tmp, "wb") as out, safe_open(str(source), "pt") as reader:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for name in names:
            original = reader.get_tensor(name)
            tensor = transform(name, original)
            if tensor.dtype != original.dtype or tensor.shape != original.shape:
                raise ValueError(f"transform changed {name}")  # a bug in the caller, not user input
            out.write(_tensor_bytes(tensor))


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    tensor = tensor.detach().contiguous().cpu()
    if tensor.numel() == 0:
        return b""
    return tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
