"""Opt-in reading of pickle-based weight files (.ckpt, .pt, .pth, .bin): restricted unpickling, then safetensors.

Pickle files can run code when loaded, so every command refuses them unless the user passes `--allow-pickle`;
even then they are read with `torch.load(weights_only=True)`, which only rebuilds tensors and plain
containers, and converted to a temporary `.safetensors` file so the rest of the tool reads one format.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lora_cli.errors import LoraCliError
from lora_cli.io.safetensors_file import PICKLE_SUFFIXES, save_tensors


def is_pickle(path: Path) -> bool:
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


@contextmanager
def as_safetensors(paths: list[Path], allow_pickle: bool, scratch_beside: Path) -> Iterator[list[Path]]:
    """The given paths, with pickle files replaced by temporary safetensors copies when `allow_pickle`
    (otherwise they are passed through, and the safetensors readers refuse them with a one-line error)."""
    if not allow_pickle or not any(is_pickle(path) for path in paths):
        yield paths
        return
    scratch_beside.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".lora-cli-unpickled.", dir=scratch_beside) as scratch:
        yield [_convert(path, Path(scratch) / str(index) / f"{path.stem}.safetensors") if is_pickle(path) else path
               for index, path in enumerate(paths)]  # fmt: skip


def _convert(path: Path, target: Path) -> Path:
    import pickle

    import torch

    if not path.is_file():
        raise LoraCliError(f"{path}: file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LoraCliError(f"{path}: cannot be read as a plain tensor file ({first[:160]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    tensors = (
        {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
        if isinstance(state, dict)
        else {}
    )
    if not tensors:
        raise LoraCliError(f"{path}: holds no tensors by name (not a state dict)")
    seen: set[int] = set()  # safetensors refuses tensors that share storage (EMA copies, tied weights)
    unique = {}
    for key, value in tensors.items():
        pointer = value.untyped_storage().data_ptr()
        unique[key] = value.clone() if pointer in seen else value
        seen.add(pointer)
    save_tensors(target, unique, {})
    return target
