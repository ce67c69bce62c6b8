"""Full tensors and their shards (DTensors, as FSDP holds parameters): gather one, or split one like another."""

from __future__ import annotations

from typing import Any

import torch


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor; for a shard, gathered from every process (each must call this in the same order)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def gather_state(value: Any) -> Any:
    """A (possibly nested) state dict with every shard replaced by its full tensor."""
    if isinstance(value, torch.Tensor):
        return full_tensor(value)
    if isinstance(value, dict):
        return {key: gather_state(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(gather_state(item) for item in value)
    return value


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`value`, a full tensor of `like`'s shape, split across processes the way `like` is (unchanged when `like`
    is not sharded). Every process must call this with the same value."""
    if not is_sharded(like) or value.shape != like.shape:
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(device=like.device, dtype=like.dtype), like.device_mesh, like.placements)
