"""Preset changes that make a run fit a memory budget, proposed greedily in order of what they cost.

Free changes come first (caching, checkpointing, sharding over several processes: same result, more time),
then ones that barely change the result (8-bit optimizer, bf16 on a GPU, quantized base), then ones that
change the training itself (smaller batches with accumulation, lower resolution). Each is taken only if it
lowers the excess over the budgets, and the search stops as soon as the run fits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from lora_cli.adapters.registry import get_algorithm
from lora_cli.config.schema import fsdp_conflict
from lora_cli.models.quantize import BITSANDBYTES_MODES
from lora_cli.planning.estimate import MemoryPlan, PlanSettings, estimate_memory
from lora_cli.planning.inventory import BaseInventory
from lora_cli.units import format_size

RESOLUTIONS = (1024, 768, 640, 512, 384, 256)


@dataclass(frozen=True)
class Change:
    """Preset values to set, and the estimated peaks once this and every earlier change are made."""

    updates: dict[str, object]
    peak_device_bytes: int
    peak_ram_bytes: int

    def line(self) -> str:
        return ", ".join(f"{key}: {_yaml(value)}" for key, value in self.updates.items())

    def overrides(self) -> list[str]:
        """The change as `lora-train --set` values."""
        return [f"{key}={_yaml(value)}" for key, value in self.updates.items()]


@dataclass(frozen=True)
class Advice:
    device: str
    changes: tuple[Change, ...]
    fits: bool
    message: str


@dataclass(frozen=True)
class Budget:
    """Memory limits; `vram` applies to the device of a "cuda" plan, `ram` to system RAM."""

    vram: int | None = None
    ram: int | None = None

    def excess(self, plan: MemoryPlan) -> int:
        over = 0
        if self.vram is not None and plan.device == "cuda":
            over += max(0, plan.peak_device_bytes - self.vram)
        if self.ram is not None:
            over += max(0, plan.peak_ram_bytes - self.ram)
        return over


Option = tuple[dict[str, object], PlanSettings]


def advise(inventory: BaseInventory, settings: PlanSettings, budget: Budget, device: str = "cuda") -> Advice:
    """Changes, in order, that bring the estimated peaks within `budget`, or why none can."""
    if budget.vram is not None and device != "cuda":
        raise ValueError("a VRAM budget needs a cuda plan")
    plan = estimate_memory(inventory, settings, device)
    settings = replace(settings, offloadable_blocks=plan.offloadable_blocks)
    if not budget.excess(plan):
        return Advice(device, (), True, f"fits: {_peaks(plan, budget)}")
    changes: list[Change] = []
    for candidates in _CANDIDATES:
        options = list(candidates(settings, device))
        chosen = _choose(inventory, options, budget, device, budget.excess(plan))
        if chosen is None:
            continue
        (updates, settings), plan = chosen
        changes.append(Change(updates, plan.peak_device_bytes, plan.peak_ram_bytes))
        if not budget.excess(plan):
            return Advice(device, tuple(changes), True, f"fits with {len(changes)} change(s): {_peaks(plan, budget)}")
    return Advice(
        device,
        tuple(changes),
        False,
        f"cannot fit: even with every change below the estimate is {_peaks(plan, budget)}",
    )


def _choose(
    inventory: BaseInventory, options: list[Option], budget: Budget, device: str, excess: int
) -> tuple[Option, MemoryPlan] | None:
    """The first option (they go from mildest to strongest) that fits, else the one that helps most."""
    best: tuple[Option, MemoryPlan] | None = None
    for option in options:
        plan = estimate_memory(inventory, option[1], device)
        if not budget.excess(plan):
            return option, plan
        if budget.excess(plan) < (budget.excess(best[1]) if best else excess):
            best = option, plan
    return best


def _caching(settings: PlanSettings, device: str) -> Iterator[Option]:
    if not settings.cache_latents:
        yield {"cache.latents": True}, replace(settings, cache_latents=True)


def _text_caching(settings: PlanSettings, device: str) -> Iterator[Option]:
    if settings.text_cache_allowed and not settings.cache_text_embeddings:
        yield {"cache.text_embeddings": True}, replace(settings, cache_text_embeddings=True)


def _checkpointing(settings: PlanSettings, device: str) -> Iterator[Option]:
    if not settings.gradient_checkpointing:
        yield {"train.gradient_checkpointing": True}, replace(settings, gradient_checkpointing=True)


def _sharding(settings: PlanSettings, device: str) -> Iterator[Option]:
    """FSDP over the processes: the same result, more transfers; not with what it cannot shard."""
    conflict = fsdp_conflict(settings.quantize, settings.mixed_precision, settings.optimizer)
    if settings.processes > 1 and not settings.sharded and conflict is None:
        yield {"distributed.strategy": "fsdp"}, replace(settings, sharded=True)


def _optimizer(settings: PlanSettings, device: str) -> Iterator[Option]:
    if settings.optimizer == "adamw" and not settings.sharded:  # Prodigy has no 8-bit form; FSDP cannot use it
        yield {"train.optimizer": "adamw8bit"}, replace(settings, optimizer="adamw8bit")


def _autocast(settings: PlanSettings, device: str) -> Iterator[Option]:
    """bf16 activations: on a GPU only (slow on CPUs, and not measured there)."""
    if device == "cuda" and settings.mixed_precision == "no" and settings.dtype == "float32":
        yield {"train.mixed_precision": "bf16"}, replace(settings, mixed_precision="bf16")


def _half_weights(settings: PlanSettings, device: str) -> Iterator[Option]:
    if device == "cuda" and settings.dtype == "float32":
        yield {"model.dtype": "bfloat16"}, replace(settings, dtype="bfloat16")


# Quantized bases to try from each mode, lightest loss first: fp8 (every algorithm) before nf4 (bitsandbytes,
# LoRA/LoCon only); int8 weighs what fp8 weighs and runs slower, so it is never proposed.
_LIGHTER = {"none": ("fp8", "nf4"), "fp8": ("nf4",), "int8": ("nf4",)}


def _quantization(settings: PlanSettings, device: str) -> Iterator[Option]:
    if settings.sharded:  # FSDP cannot shard quantized weights
        return
    bitsandbytes = get_algorithm(settings.adapter.type).quantized_base
    for mode in _LIGHTER.get(settings.quantize, ()):
        if mode in BITSANDBYTES_MODES and not bitsandbytes:
            continue
        yield {"model.quantize": mode}, replace(settings, quantize=mode)


def _offload(settings: PlanSettings, device: str) -> Iterator[Option]:
    """More of a DiT's blocks in pinned host memory, fewest first (each costs its copies' time, mostly hidden
    behind computation); with gradient checkpointing, which offloading needs."""
    if device != "cuda" or settings.sharded:
        return
    for count in range(settings.offload_blocks + 1, settings.offloadable_blocks + 1):
        updates: dict[str, object] = {"train.offload_blocks": count}
        if not settings.gradient_checkpointing:
            updates["train.gradient_checkpointing"] = True
        yield updates, replace(settings, offload_blocks=count, gradient_checkpointing=True)


def _batch(settings: PlanSettings, device: str) -> Iterator[Option]:
    """Smaller micro-batches, accumulated so that each step still sees as many images."""
    images = settings.batch_size * settings.gradient_accumulation
    for size in range(settings.batch_size - 1, 0, -1):
        if images % size == 0:
            updates = {"train.batch_size": size, "train.gradient_accumulation": images // size}
            yield updates, replace(settings, batch_size=size, gradient_accumulation=images // size)


def _resolution(settings: PlanSettings, device: str) -> Iterator[Option]:
    for size in RESOLUTIONS:
        if size < settings.resolution:
            yield {"data.resolution": size}, replace(settings, resolution=size)


_CANDIDATES: tuple[Callable[[PlanSettings, str], Iterator[Option]], ...] = (
    _caching,
    _text_caching,
    _checkpointing,
    _sharding,
    _optimizer,
    _autocast,
    _half_weights,
    _quantization,
    _offload,
    _batch,
    _resolution,
)


def _peaks(plan: MemoryPlan, budget: Budget) -> str:
    parts = []
    if plan.device == "cuda":
        limit = f" of {format_size(budget.vram)}" if budget.vram is not None else ""
        parts.append(f"VRAM {format_size(plan.peak_device_bytes)}{limit}")
    limit = f" of {format_size(budget.ram)}" if budget.ram is not None else ""
    parts.append(f"RAM {format_size(plan.peak_ram_bytes)}{limit}")
    return ", ".join(parts)


def _yaml(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
