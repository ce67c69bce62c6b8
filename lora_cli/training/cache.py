"""On-disk caches of VAE encodings and text embeddings, keyed by content hashes, reused across runs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from lora_cli.errors import CheckpointError
from lora_cli.io.safetensors_file import load_tensors, save_tensors


class EncodingCache:
    """A folder of small safetensors files, one per key; keys hash the input and the encoder's identity."""

    def __init__(self, folder: Path, namespace: str) -> None:
        self.folder = folder
        self.namespace = namespace

    def key(self, *parts: str) -> str:
        return hashlib.sha256("\0".join((self.namespace, *parts)).encode()).hexdigest()

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            tensors, _ = load_tensors(path, CheckpointError)
        except CheckpointError:
            path.unlink(missing_ok=True)  # a damaged entry is recomputed, never trusted
            return None
        return tensors

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        save_tensors(self._path(key), tensors, {})

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"
