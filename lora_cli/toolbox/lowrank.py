"""Low-rank approximations of weight updates: `lora-extract` (from two models) and `lora-resize` (from an
adapter of any algorithm), both producing plain LoRA/LoCon by truncated SVD."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lora_cli.adapters.files import AdapterFile, read_adapter, read_adapter_standalone, write_adapter
from lora_cli.adapters.functional import delta_weight, merged_weight
from lora_cli.adapters.keys import AdapterTensors, ModuleKey
from lora_cli.adapters.registry import get_algorithm
from lora_cli.errors import AdapterError
from lora_cli.models.naming import KohyaComponent

if TYPE_CHECKING:
    from lora_cli.models.base import Architecture

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
    squares = s.double().pow(2)
    total = float(squares.sum()) or 1.0
    if rank is None and min(energy or 1.0, 1.0) >= 1.0:
        # the numerical rank (singular values above float32 noise, as torch.linalg.matrix_rank counts them), so no
        # real direction is cut by the rounding of a cumulative share and no noise is kept
        rank = int((s > s[0] * torch.finfo(s.dtype).eps * max(matrix.shape)).sum())
    elif rank is None:
        rank = int((torch.cumsum(squares, 0) / total < energy - 1e-9).sum()) + 1
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


def extract(base: str, tuned: str, out: Path, rank: int | None, energy: float | None) -> list[LayerReport]:
    """A LoRA from the difference of two bases of the same architecture (anything `--base` takes)."""
    from lora_cli.models.weights import open_base_weights

    with open_base_weights(base, "BASE") as before, open_base_weights(tuned, "TUNED") as after:
        architecture = before.source.architecture
        if architecture is not after.source.architecture:
            raise AdapterError(
                f"{tuned} is a {after.source.architecture.name} and {base} a {architecture.name}; "
                "extract needs two models of one architecture"
            )
        after_shapes = after.adaptable_shapes()
        tensors: AdapterTensors = {}
        reports = []
        for key, shape in before.adaptable_shapes().items():
            if after_shapes.get(key) != shape:
                continue
            delta = after.read_weight(key).float() - before.read_weight(key).float()
            if delta.abs().max() < MIN_CHANGE:
                continue
            tensors[key], kept = low_rank(delta, rank, energy)
            reports.append(LayerReport(key[1], int(tensors[key]["alpha"]), kept))
    if not tensors:
        raise AdapterError(f"{tuned}: no weight differs from {base}; there is nothing to extract")
    extracted = json.dumps({"base": str(base), "tuned": str(tuned)})
    save_lora(out, tensors, architecture, architecture.default_format, {"lora_cli.extracted_from": extracted})
    return reports


def resize(path: Path, out: Path, rank: int | None, energy: float | None, base: str | None) -> list[LayerReport]:
    """Any adapter (LoRA, LoHa, LoKr, DoRA) re-expressed as plain LoRA of the given rank or energy share, in
    the layout it came in (kohya or diffusers; other layouts become the architecture's usual one)."""
    if out.exists():
        raise AdapterError(f"{out} already exists; choose a new file (nothing is overwritten)")
    if base is None:
        return _resize_layers(read_adapter_standalone(path, literal_stems=True), out, rank, energy, {}, None)
    from lora_cli.adapters.catalog import ModuleCatalog
    from lora_cli.models.weights import open_base_weights

    with open_base_weights(base, "--base") as weights:
        catalog = ModuleCatalog.from_weights(weights)
        return _resize_layers(read_adapter(path, catalog), out, rank, energy, catalog.shapes, weights.read_weight)


def _resize_layers(
    file: AdapterFile,
    out: Path,
    rank: int | None,
    energy: float | None,
    shapes: dict[ModuleKey, tuple[int, ...]],
    load: Callable[[ModuleKey], torch.Tensor] | None,
) -> list[LayerReport]:
    result: AdapterTensors = {}
    reports = []
    for key, named in file.tensors.items():
        shape = torch.Size(shapes[key]) if key in shapes else _shape_from_lora(named, key[1], file.path)
        if "dora_scale" in named:
            if load is None:
                raise AdapterError(f"{file.path}: DoRA layers depend on the base weights; pass --base to resize them")
            weight = load(key).float()
            delta = merged_weight(weight, named) - weight
        else:
            delta = delta_weight(named, shape)
        result[key], kept = low_rank(delta, rank, energy)
        reports.append(LayerReport(key[1], int(result[key]["alpha"]), kept))
    literal = all(module.startswith("lora_") for _, module in result) and file.layout in ("kohya", "lycoris")
    metadata = {"lora_cli.resized_from": file.path.name}
    save_lora(out, result, file.architecture, output_format(file), metadata, literal)
    return reports


def output_format(file: AdapterFile) -> str:
    """The layout a rewritten adapter keeps: kohya or diffusers as it came; other layouts become the
    architecture's usual one."""
    layout = file.metadata.get("lora_cli.format", "kohya" if file.layout in ("kohya", "lycoris") else "")
    return layout if layout in ("kohya", "diffusers") else file.architecture.default_format


def _shape_from_lora(named: Named, module: str, path: Path) -> torch.Size:
    """LoRA/LoCon files record each layer's shape in down/up; LoHa/LoKr files do not (convolutions are
    flattened), so those need the base."""
    if "lora_down.weight" in named:
        down, up = named["lora_down.weight"], named["lora_up.weight"]
        return torch.Size((up.shape[0], *down.shape[1:]))
    raise AdapterError(f"{path}: LoHa/LoKr layers do not record their shapes ({module}); pass --base")


def save_lora(
    out: Path,
    tensors: AdapterTensors,
    architecture: Architecture,
    file_format: str,
    metadata: dict[str, str],
    literal: bool = False,
) -> None:
    """Write plain LoRA (alpha = rank per layer); `literal` writes module names that are kohya stems as they are."""
    if out.exists():
        raise AdapterError(f"{out} already exists; choose a new file (nothing is overwritten)")
    ranks = {key: int(named["alpha"]) for key, named in tensors.items()}
    first = next(iter(ranks.values()))
    info = {
        "lora_cli.algorithm": "lora",
        "lora_cli.rank": str(first),
        "lora_cli.alpha": str(first),
        "lora_cli.base_architecture": architecture.name,
        **metadata,
    }
    table = {component: KohyaComponent("") for component in architecture.kohya_table} if literal else None
    write_adapter(out, tensors, ranks, get_algorithm("lora"), file_format, architecture, info, kohya_table=table)
