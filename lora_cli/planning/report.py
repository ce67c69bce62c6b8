"""The memory plan and the advice as plain text lines for the terminal."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from lora_cli.config.schema import fsdp_conflict
from lora_cli.errors import PresetError
from lora_cli.planning.advice import Advice, Budget, advise
from lora_cli.planning.estimate import MemoryPlan, PlanSettings, estimate_memory
from lora_cli.planning.inventory import read_inventory
from lora_cli.planning.parts import Part, resident
from lora_cli.units import format_size

if TYPE_CHECKING:
    from lora_cli.config.schema import Preset


def plan_report(
    preset: Preset,
    vram: int | None = None,
    ram: int | None = None,
    images: int | None = None,
    processes: int = 1,
    host_link_gbps: float | None = None,
) -> str:
    """What `lora-train --plan` prints: the GPU plan, the CPU-only RAM peak, and with budgets the changes
    that make the GPU run fit; per process when `processes` train together. `host_link_gbps` is the host-to-GPU
    bandwidth offloaded blocks are copied at (default: `HOST_LINK_GBPS`)."""
    settings = PlanSettings.from_preset(preset, images, processes)
    if host_link_gbps is not None:
        settings = replace(settings, host_link_gbps=host_link_gbps)
    conflict = fsdp_conflict(settings.quantize, settings.mixed_precision, settings.optimizer)
    if settings.sharded and conflict:  # the run would be refused: no figures for it
        raise PresetError(conflict)
    inventory = read_inventory(preset.model)
    plan = estimate_memory(inventory, settings, "cuda")
    cpu = estimate_memory(inventory, settings, "cpu")
    lines = [format_plan(plan), f"Training on the CPU only instead: RAM peak {format_size(cpu.peak_ram_bytes)}"]
    if vram is not None or ram is not None:
        lines += ["", format_advice(advise(inventory, settings, Budget(vram, ram), "cuda"))]
    return "\n".join(lines)


def format_plan(plan: MemoryPlan) -> str:
    """A breakdown of each peak, largest first within its phase."""
    settings = plan.settings
    adapter = settings.adapter
    where = "a GPU (cuda)" if plan.device == "cuda" else "the CPU only"
    lines = [
        f"Memory plan for training on {where}: estimates from the preset and the weights' headers",
        f"adapter: {adapter.type} rank {adapter.rank} on {plan.adapted_layers} layers, "
        f"{plan.adapter_parameters:,} parameters; batch {settings.batch_size}, {settings.resolution} px, "
        + (f"{settings.frames} frames, " if settings.frames else "")
        + f"model.dtype {settings.dtype}, quantize {settings.quantize}",
    ]
    if settings.processes > 1:
        strategy = "FSDP: the denoiser sharded" if settings.sharded else "DDP: each holds the whole base"
        lines.append(f"{settings.processes} processes ({strategy}); every figure is per process")
    if plan.device == "cuda":
        lines += _section("GPU memory", plan.peak_device_bytes, plan.device_phase, plan.device_parts)
    lines += _section("RAM", plan.peak_ram_bytes, plan.ram_phase, plan.ram_parts)
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)


def format_advice(advice: Advice) -> str:
    """The proposed preset changes, each with the peaks it leads to, then the verdict."""
    lines = []
    for number, change in enumerate(advice.changes, 1):
        vram = f"VRAM {format_size(change.peak_device_bytes)}, " if advice.device == "cuda" else ""
        lines.append(f"{number}. {change.line()}  -> {vram}RAM {format_size(change.peak_ram_bytes)}")
    lines.append(advice.message)
    if advice.fits and advice.changes:
        sets = " ".join(f"--set {value}" for change in advice.changes for value in change.overrides())
        lines.append(f"to train so: add {sets} to the lora-train command, or make those changes in the preset")
    return "\n".join(lines)


def _section(title: str, peak: int, phase: str, parts: tuple[Part, ...]) -> list[str]:
    """The peak and its parts, largest first; file pages read once (memory-mapped weights) listed apart."""
    width = max(len(part.name) for part in parts)
    lines = [f"{title} peak: {format_size(peak)} (while {_PHASES[phase]})"]
    needed = [part for part in parts if not part.file_pages]
    for part in sorted(needed, key=lambda p: -p.bytes):
        lines.append(f"  {part.name:<{width}}  {format_size(part.bytes):>10}")
    pages = sorted((part for part in parts if part.file_pages), key=lambda p: -p.bytes)
    if pages:
        lines.append(
            f"  plus {format_size(resident(tuple(pages)))} of memory-mapped weight files read once: "
            "RSS shows them, the kernel drops them when RAM runs short"
        )
        lines += [f"  {part.name:<{width}}  {format_size(part.bytes):>10}" for part in pages]
    return lines


_PHASES = {
    "load": "loading the base",
    "cache": "filling the caches",
    "train": "training",
    "start": "the denoiser moves to the GPU; training keeps only the pinned copies",
}
