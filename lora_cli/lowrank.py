"""Low-rank approximations of weight updates: `lora-extract` (from two models) and `lora-resize` (from an
adapter of any algorithm), both producing plain LoRA/LoCon in the kohya layout by truncated SVD."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_cli.adapters.functional import delta_weight, merged_weight
from lora_cli.adapters.registry import get_algorithm
from lora_cli.errors import AdapterError
from lora_cli.io.adapter_file import read_adapter, save_adapter
from lora_cli.io.keys import AdapterTensors, KohyaTable, ModuleKey

MIN_CHANGE = 1e-8  # layers whose update is smaller than this (max abs) are left out


@dataclass(frozen=True)
class LayerReport:
    module: str
    rank: int
    energy: float  # share of the update's squared singular values that is kept


def low_rank(delta: torch.Tensor, rank: int | None, energy: float | None) -> tuple[Named, float]:
    """up @ down ≈ delta (float32, alpha = rank so the scale is 1). Convolutions: down k×k, up 1×1 (LoCon)."""
    matrix = delta.float().flatten(1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    squares = s.pow(2)
    total = float(squares.sum()) or 1.0
    if rank is None:
        kept = torch.cumsum(squares, 0) / total
        rank = int(torch.searchsorted(kept, torch.tensor(min(energy or 1.0, 1.0) - 1e-9)).item()) + 1
    rank = max(1, min(rank, s.numel()))
    root = s[:rank].sqrt()
    up, down = u[:, :rank] * root, root[:, None] * vh[:rank]
    if delta.dim() == 4:
        up, down = up[:, :, None, None], down.reshape(rank, *delta.shape[1:])
    named = {
        "lora_down.weight": down.contiguous(),
        "lora_up.weight": up.contiguous(),
        "alpha": torch.tensor(float(rank)),
    }
    return named, float(squares[:rank].sum()) / total


Named = dict[str, torch.Tensor]


def extract(base: Path, tuned: Path, out: Path, rank: int | None, energy: float | None) -> list[LayerReport]:
    """A LoRA from the difference of two bases of the same architecture (diffusers folders or single files)."""
    from lora_cli.models.weights import open_base_weights

    before, after = open_base_weights(base), open_base_weights(tuned)
    tensors: AdapterTensors = {}
    reports = []
    for key, shape in before.shapes.items():
        if len(shape) not in (2, 4) or after.shapes.get(key) != shape:
            continue
        delta = after.read_weight(key).float() - before.read_weight(key).float()
        if delta.abs().max() < MIN_CHANGE:
            continue
        tensors[key], kept = low_rank(delta, rank, energy)
        reports.append(LayerReport(key[1], int(tensors[key]["alpha"]), kept))
    if not tensors:
        raise AdapterError(f"{tuned}: no weight differs from {base}; there is nothing to extract")
    _save(out, tensors, before.table, {"lora_cli.extracted_from": json.dumps({"base": str(base), "tuned": str(tuned)})})
    return reports


def resize(path: Path, out: Path, rank: int | None, energy: float | None, base: Path | None) -> list[LayerReport]:
    """Any adapter (LoRA, LoHa, LoKr, DoRA) re-expressed as plain LoRA of the given rank or energy share."""
    from lora_cli.models.weights import open_base_weights

    if base is None:
        tensors, table = _adapter_without_base(path)
        shapes: dict[ModuleKey, tuple[int, ...]] = {}
        load = None
    else:
        weights = open_base_weights(base)
        shapes, table, load = weights.shapes, weights.table, weights.read_weight
        _, tensors, _ = read_adapter(path, weights.kohya_index())
    result: AdapterTensors = {}
    reports = []
    for key, named in tensors.items():
        shape = torch.Size(shapes[key]) if key in shapes else _shape_from_lora(named, key[1], path)
        if "dora_scale" in named:
            if load is None:
                raise AdapterError(f"{path}: DoRA layers depend on the base weights; pass --base to resize them")
            weight = load(key).float()
            delta = merged_weight(weight, named) - weight
        else:
            delta = delta_weight(named, shape)
        result[key], kept = low_rank(delta, rank, energy)
        reports.append(LayerReport(key[1], int(result[key]["alpha"]), kept))
    _save(out, result, table, {"lora_cli.resized_from": path.name})
    return reports


def _adapter_without_base(path: Path) -> tuple[AdapterTensors, KohyaTable]:
    """Read a kohya-layout adapter of the SD family without a base: module names come from the stems."""
    from lora_cli.io.safetensors_file import load_tensors
    from lora_cli.models.stable_diffusion import StableDiffusion

    flat, _ = load_tensors(path, AdapterError)
    table = StableDiffusion.kohya_table
    tensors: AdapterTensors = {}
    for key, value in flat.items():
        stem, _, name = key.partition(".")
        component = next((c for c, spec in table.items() if stem.startswith(spec.prefix)), None)
        if component is None:
            raise AdapterError(f"{path}: key {key} is not in the kohya layout; pass --base to read it")
        tensors.setdefault((component, stem), {})[name] = value
    return tensors, table


def _shape_from_lora(named: Named, module: str, path: Path) -> torch.Size:
    """LoRA/LoCon files record each layer's shape in down/up; LoHa/LoKr files do not (convolutions are
    flattened), so those need the base."""
    if "lora_down.weight" in named:
        down, up = named["lora_down.weight"], named["lora_up.weight"]
        return torch.Size((up.shape[0], *down.shape[1:]))
    raise AdapterError(f"{path}: LoHa/LoKr layers do not record their shapes ({module}); pass --base")


def _save(out: Path, tensors: AdapterTensors, table: KohyaTable, metadata: dict[str, str]) -> None:
    if out.exists():
        raise AdapterError(f"{out} already exists; choose a new file (nothing is overwritten)")
    ranks = {key: int(named["alpha"]) for key, named in tensors.items()}
    first = next(iter(ranks.values()))
    info = {"lora_cli.algorithm": "lora", "lora_cli.rank": str(first), "lora_cli.alpha": str(first), **metadata}
    save_adapter(out, tensors, ranks, get_algorithm("lora"), "kohya", _literal_table(tensors, table), info)


def _literal_table(tensors: AdapterTensors, table: KohyaTable) -> KohyaTable:
    """Modules read from stems (no base) are already kohya stems: write them back unchanged."""
    from lora_cli.io.keys import KohyaComponent

    if all(module.startswith("lora_") for _, module in tensors):
        return {component: KohyaComponent("") for component in table}
    return table
