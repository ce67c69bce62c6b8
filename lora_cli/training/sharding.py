"""Fully sharded data parallel (torch's FSDP2, `fully_shard`): the denoiser's frozen weights, its adapter,
gradients and optimizer state are split across processes, one shard unit per block.

Sharded tensors are DTensors. Everything that leaves the run (adapter files, checkpoints) holds full tensors,
gathered by every process together, so a checkpoint written by N sharded processes resumes on any number of
processes with or without sharding.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from lora_cli.config.schema import Preset, fsdp_conflict
from lora_cli.errors import PresetError
from lora_cli.models import LoadedBase
from lora_cli.sharded_tensors import is_sharded, shard_like
from lora_cli.units import format_size


def refuse_unsupported_launch() -> None:
    """`accelerate launch` with a DeepSpeed or Megatron-LM config: say what to use instead (before accelerate
    tries to start them)."""
    for variable, name in (("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"), ("ACCELERATE_USE_MEGATRON_LM", "Megatron-LM")):
        if os.environ.get(variable, "").lower() == "true":
            raise PresetError(
                f"the accelerate config selects {name}, which lora-cli does not run under; launch with a "
                "multi-GPU or FSDP config (`distributed.strategy: fsdp` shards the base like ZeRO-3), see "
                "docs/distributed.md"
            )


def wants_sharding(preset: Preset, accelerator: Any) -> bool:
    """FSDP is asked for by the preset (`distributed.strategy: fsdp`) or by the accelerate config; it only
    applies on several processes. Settings it cannot shard are refused here."""
    from_accelerate = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"  # set by `accelerate launch`
    if not (preset.distributed.strategy == "fsdp" or from_accelerate) or accelerator.num_processes == 1:
        return False
    conflict = fsdp_conflict(preset.model.quantize, preset.train.mixed_precision, preset.train.optimizer)
    if conflict:
        raise PresetError(conflict)
    if preset.train.offload_blocks:
        raise PresetError("train.offload_blocks cannot offload FSDP shards; set it to 0 or launch without FSDP")
    return True


def shard_denoiser(base: LoadedBase, reshard_after_forward: bool, device: torch.device, processes: int) -> None:
    """Shard each block of the denoiser, then the rest (embeddings, norms, projections) as the root unit.
    `fully_shard` moves one unit at a time to the device, so no process ever holds the whole base there."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # Flux's blocks return views of one concatenated tensor, and FSDP warns that an in-place op on such a view
    # would skip its backward hook. Neither diffusers' forward nor the loss does that (sharded and DDP runs
    # train the same adapter: tests/reliability/test_sharding.py), so the warning would only alarm users.
    warnings.filterwarnings("ignore", message=r".*returned a view tensor", category=UserWarning)
    denoiser = base.denoiser
    mesh = init_device_mesh(device.type, (processes,))
    for name in base.architecture.blocks(denoiser):
        fully_shard(denoiser.get_submodule(name), mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(denoiser, mesh=mesh, reshard_after_forward=reshard_after_forward)


def shard_optimizer_state(optimizer: Any, state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state dict of full tensors (from a checkpoint) with each parameter's per-element state
    (Adam's moments) split like the parameter, ready for `load_state_dict`."""
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    per_parameter = {
        index: {name: shard_like(value, parameters[index]) if isinstance(value, torch.Tensor) else value
                for name, value in entries.items()}
        for index, entries in state["state"].items()
    }  # fmt: skip
    return {**state, "state": per_parameter}


@contextlib.contextmanager
def gradient_sync_paused(accelerator: Any, denoiser: torch.nn.Module) -> Iterator[None]:
    """Accumulate gradients locally (no all-reduce / reduce-scatter) for the micro-batches before the last."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(denoiser, FSDPModule):
        with accelerator.no_sync(denoiser):
            yield
        return
    denoiser.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        denoiser.set_requires_gradient_sync(True)


def sharding_summary(denoiser: torch.nn.Module, processes: int) -> str:
    """One line: how much of the denoiser's frozen weights this process holds (its adapter is split alike)."""
    frozen = [p for p in denoiser.parameters() if not p.requires_grad]
    held = sum(_local_part(p).numel() * p.element_size() for p in frozen)
    total = sum(p.numel() * p.element_size() for p in frozen)
    return (
        f"FSDP: the denoiser is sharded over {processes} processes; this process holds {format_size(held)} "
        f"({100 * held / total:.0f}%) of its {format_size(total)} of base weights"
    )


def _local_part(parameter: torch.Tensor) -> torch.Tensor:
    return parameter.to_local() if is_sharded(parameter) else parameter
