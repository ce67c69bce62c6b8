"""Resumable checkpoints: adapter, optimizer, LR schedule, RNG states and data position, safetensors only.

A checkpoint is a folder `checkpoints/step-000123/` written under a temporary name and renamed in one
step, holding `adapter.safetensors` (kohya layout) and `state.safetensors` (tensors + JSON metadata).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_cli.errors import CheckpointError
from lora_cli.io.atomic import atomic_directory, remove_directory
from lora_cli.io.safetensors_file import load_tensors, save_tensors

STATE_FILE = "state.safetensors"
ADAPTER_FILE = "adapter.safetensors"
PREFIX = "step-"


@dataclass
class TrainingState:
    """Everything besides the adapter weights that an exact resume needs."""

    step: int
    micro_step: int
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    torch_rng: torch.Tensor
    cuda_rng: list[torch.Tensor]
    preset: dict[str, Any]
    grad_scaler: dict[str, Any] | None = None  # fp16 loss scaling, so a resumed run keeps its scale
    processes: int = 1  # the global batch is batch_size x processes; a resume on another count converts
    objective: dict[str, Any] | None = None  # the training objective's own state (a distillation's EMA target)


def checkpoint_dir(checkpoints: Path, step: int) -> Path:
    return checkpoints / f"{PREFIX}{step:06d}"


def list_checkpoints(checkpoints: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted writes are ignored)."""
    if not checkpoints.is_dir():
        return []
    found = [
        p for p in checkpoints.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=lambda p: p.name)


def save_checkpoint(folder: Path, adapter_tensors: dict[str, torch.Tensor], state: TrainingState) -> None:
    tensors, metadata = _flatten(state)
    with atomic_directory(folder) as tmp:
        save_tensors(tmp / ADAPTER_FILE, adapter_tensors, {"lora_cli.checkpoint_step": str(state.step)})
        save_tensors(tmp / STATE_FILE, tensors, metadata)


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], TrainingState]:
    if not (folder / STATE_FILE).is_file() or not (folder / ADAPTER_FILE).is_file():
        raise CheckpointError(f"{folder}: not a lora-cli checkpoint (needs {ADAPTER_FILE} and {STATE_FILE})")
    adapter, _ = load_tensors(folder / ADAPTER_FILE, CheckpointError)
    tensors, metadata = load_tensors(folder / STATE_FILE, CheckpointError)
    try:
        return adapter, _unflatten(tensors, metadata)
    except (KeyError, ValueError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{folder}: damaged checkpoint state ({exc})") from None


def prune_checkpoints(checkpoints: Path, keep: int) -> None:
    for old in list_checkpoints(checkpoints)[:-keep]:
        remove_directory(old)  # never visible half-deleted


def _flatten(state: TrainingState) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {"rng.torch": state.torch_rng}
    tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(state.cuda_rng)})
    metadata = {
        "step": str(state.step),
        "micro_step": str(state.micro_step),
        "processes": str(state.processes),
        "optimizer": json.dumps(_encode(state.optimizer, "optimizer", tensors)),
        "scheduler": json.dumps(_encode(state.scheduler, "scheduler", tensors)),
        "preset": json.dumps(state.preset),
        "grad_scaler": json.dumps(_encode(state.grad_scaler, "grad_scaler", tensors)),
        "objective": json.dumps(_encode(state.objective, "objective", tensors)),
    }
    return tensors, metadata


def _unflatten(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> TrainingState:
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    return TrainingState(
        step=int(metadata["step"]),
        micro_step=int(metadata["micro_step"]),
        optimizer=_decode(json.loads(metadata["optimizer"]), tensors),
        scheduler=_decode(json.loads(metadata["scheduler"]), tensors),
        torch_rng=tensors["rng.torch"],
        cuda_rng=[tensors[k] for k in cuda],
        preset=json.loads(metadata["preset"]),
        grad_scaler=_decode(json.loads(metadata.get("grad_scaler", "null")), tensors),
        processes=int(metadata.get("processes", "1")),
        objective=_decode(json.loads(metadata.get("objective", "null")), tensors),
    )


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A state dict as JSON with tensors moved to `tensors`; int keys and tuples survive the trip."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value
        return {"tensor": path}
    if isinstance(value, dict):
        return {"dict": [[key, _encode(item, f"{path}.{key}", tensors)] for key, item in value.items()]}
    if isinstance(value, (list, tuple)):
        kind = "tuple" if isinstance(value, tuple) else "list"
        return {kind: [_encode(item, f"{path}.{i}", tensors) for i, item in enumerate(value)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise CheckpointError(f"cannot store optimizer/scheduler state of type {type(value).__name__} at {path}")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if not isinstance(value, dict):
        return value
    ((kind, content),) = value.items()
    if kind == "tensor":
        return tensors[content]
    if kind == "dict":
        return {key: _decode(item, tensors) for key, item in content}
    items = [_decode(item, tensors) for item in content]
    return tuple(items) if kind == "tuple" else items
