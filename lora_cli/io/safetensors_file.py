"""Safe access to `.safetensors` files: header checks, reading, atomic writing, and a pickle refusal."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch

from lora_cli.errors import LoraCliError
from lora_cli.io.atomic import write_with

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_header(path: str | Path, error: type[LoraCliError]) -> dict:
    """The JSON header of a safetensors file, validated before any tensor is touched."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise error(
            f"{path}: pickle-based files can run code when loaded; "
            "convert it to .safetensors (or pass --allow-pickle where offered)"
        )
    if not path.is_file():
        raise error(f"{path}: file not found")
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise error(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(MAX_HEADER_BYTES, path.stat().st_size - 8):
            raise error(f"{path}: damaged or not a safetensors file (header length {length} is impossible)")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise error(f"{path}: damaged safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise error(f"{path}: damaged safetensors header (not a JSON object)")
    return header


def read_metadata(path: str | Path, error: type[LoraCliError]) -> dict[str, str]:
    metadata = read_header(path, error).get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise error(f"{path}: safetensors metadata must map strings to strings")
    return metadata


def load_tensors(path: str | Path, error: type[LoraCliError]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file; damaged files raise `error` with one line."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    metadata = read_metadata(path, error)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise error(f"{path}: damaged safetensors file ({str(exc).splitlines()[0]})") from None
    return tensors, metadata


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write tensors atomically (temp file + rename)."""
    from safetensors.torch import save_file

    contiguous = {key: value.detach().contiguous().cpu() for key, value in tensors.items()}
    write_with(path, lambda tmp: save_file(contiguous, str(tmp), metadata=metadata))


def weights_fingerprint(files: list[Path], sample_bytes: int = 64) -> str:
    """sha256 over the headers (names, shapes, dtypes, offsets) of the given safetensors files and the first and
    last `sample_bytes` of every tensor's data: fast (no whole tensor is read), yet two bases of one
    architecture — a fine-tune and its original — differ, as their headers alone would not."""
    digest = hashlib.sha256()
    for file in sorted(files):
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = handle.read(min(length, MAX_HEADER_BYTES))
            digest.update(file.name.encode())
            digest.update(header)
            for start, end in _data_spans(header):
                for offset in sorted({start, max(start, end - sample_bytes)}):
                    handle.seek(8 + length + offset)
                    digest.update(handle.read(min(sample_bytes, end - offset)))
    return digest.hexdigest()


def _data_spans(header: bytes) -> list[tuple[int, int]]:
    """(start, end) byte offsets of every tensor's data in file order; none for a header that is not JSON."""
    try:
        entries = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return []
    spans = [
        tuple(entry["data_offsets"])
        for name, entry in entries.items()
        if name != "__metadata__" and isinstance(entry, dict) and len(entry.get("data_offsets", ())) == 2
    ]
    return sorted((int(start), int(end)) for start, end in spans)
