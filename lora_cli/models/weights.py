"""A base model's weights on disk, a diffusers folder or a single-file checkpoint, seen module by module.

Everything here reads safetensors headers and single tensors, never a whole model: merging, extraction and
`lora-info --base` work at the size of the largest tensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_cli.errors import ModelLoadError
from lora_cli.io.keys import KohyaTable, ModuleKey, kohya_module_index
from lora_cli.io.safetensors_file import PICKLE_SUFFIXES, read_header
from lora_cli.io.safetensors_stream import open_readers
from lora_cli.models.single_file import Placement, SingleFileLayout, detect_layout, from_single_file

WEIGHT = ".weight"


@dataclass
class BaseWeights:
    """Module weights of a base by (component, module path in diffusers names), with their shapes."""

    path: Path
    table: KohyaTable
    shapes: dict[ModuleKey, tuple[int, ...]]
    # A diffusers folder: the weight files of each component.
    files: dict[str, list[Path]] = field(default_factory=dict)
    # A single file: its layout and where each module's weight lives in it.
    layout: SingleFileLayout | None = None
    placements: dict[ModuleKey, Placement] = field(default_factory=dict)

    @property
    def is_single_file(self) -> bool:
        return self.layout is not None

    def modules(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for component, module in self.shapes:
            found.setdefault(component, []).append(module)
        return found

    def kohya_index(self) -> dict[str, ModuleKey]:
        return kohya_module_index(self.modules(), self.table)

    def read_weight(self, key: ModuleKey) -> torch.Tensor:
        """One module's weight in diffusers orientation."""
        if self.is_single_file:
            placement = self.placements[key]
            with open_readers([self.path], ModelLoadError) as (reader,):
                return unplace(reader.tensor(placement.key), placement)
        component, module = key
        for path in self.files[component]:
            with open_readers([path], ModelLoadError) as (reader,):
                if module + WEIGHT in reader.header:
                    return reader.tensor(module + WEIGHT)
        raise KeyError(key)


def open_base_weights(path: str | Path) -> BaseWeights:
    """The weights of a diffusers pipeline folder or a `.safetensors` single-file checkpoint."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelLoadError(
            f"{path}: pickle-based checkpoints can run code; convert it to .safetensors or pass --allow-pickle"
        )
    if path.is_file():
        return _single_file(path)
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(f"{path}: not a diffusers pipeline folder (no model_index.json) nor a .safetensors file")
    architecture = _architecture(pipeline_class(path), path)
    files = {component: component_files(path / component) for component in architecture.kohya_table}
    if not any(files.values()):
        raise ModelLoadError(f"{path}: no .safetensors weights found (pickle .bin weights are refused)")
    shapes = {}
    for component, paths in files.items():
        for file in paths:
            header = read_header(file, ModelLoadError)
            for name, entry in header.items():
                if name.endswith(WEIGHT):
                    shapes[(component, name[: -len(WEIGHT)])] = tuple(entry["shape"])
    return BaseWeights(path, architecture.kohya_table, shapes, files=files)


def component_files(folder: Path) -> list[Path]:
    """One set of a component's weight files: the plain ones (`model.safetensors`, shards included), else those
    of a single variant (`model.fp16.safetensors`); a hub snapshot often holds both."""
    by_variant: dict[str, list[Path]] = {}
    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        stem_parts = path.name.split(".")
        by_variant.setdefault(stem_parts[1] if len(stem_parts) > 2 else "", []).append(path)
    if not by_variant:
        return []
    return by_variant.get("", by_variant[min(by_variant)])


def pipeline_class(folder: Path) -> str:
    try:
        return json.loads((folder / "model_index.json").read_text())["_class_name"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ModelLoadError(f"{folder}/model_index.json is damaged (not JSON with a _class_name)") from None


def _single_file(path: Path) -> BaseWeights:
    header = read_header(path, ModelLoadError)
    header.pop("__metadata__", None)
    layout = detect_layout(header, str(path))
    architecture = _architecture(layout.pipeline_class, path)
    shapes: dict[ModuleKey, tuple[int, ...]] = {}
    placements: dict[ModuleKey, Placement] = {}
    for file_key, held in from_single_file(layout, list(header)).items():
        for component, diffusers_key, placement in held:
            if component not in architecture.kohya_table or not diffusers_key.endswith(WEIGHT):
                continue
            key = (component, diffusers_key[: -len(WEIGHT)])
            shapes[key] = placed_shape(header[file_key]["shape"], placement)
            placements[key] = placement
    return BaseWeights(path, architecture.kohya_table, shapes, layout=layout, placements=placements)


def _architecture(class_name: str, path: Path):
    from lora_cli.models import ARCHITECTURES

    architecture = next((a for a in ARCHITECTURES if a.matches(class_name)), None)
    if architecture is None:
        raise ModelLoadError(f"{path}: a {class_name} is not a base lora-cli supports yet")
    return architecture


def placed_shape(file_shape: list[int], placement: Placement) -> tuple[int, ...]:
    """The diffusers shape of a parameter stored at `placement` in a tensor of `file_shape`."""
    shape = list(file_shape)
    if placement.part is not None:
        shape[0] //= 3
    if placement.transposed:
        shape.reverse()
    if placement.conv:
        shape = shape[:2]
    return tuple(shape)


def unplace(tensor: torch.Tensor, placement: Placement) -> torch.Tensor:
    """The diffusers parameter held at `placement` of a file tensor (a view where possible)."""
    if placement.part is not None:
        rows = tensor.shape[0] // 3
        tensor = tensor[placement.part * rows : (placement.part + 1) * rows]
    if placement.transposed:
        tensor = tensor.T
    if placement.conv:
        tensor = tensor.reshape(tensor.shape[:2])
    return tensor


def place(parts: list[tuple[Placement, torch.Tensor]]) -> torch.Tensor:
    """The file tensor made of diffusers parameters (three for a fused q/k/v tensor, else one)."""
    ordered = sorted(parts, key=lambda item: item[0].part or 0)
    tensors = []
    for placement, tensor in ordered:
        if placement.transposed:
            tensor = tensor.T
        if placement.conv and tensor.dim() == 2:
            tensor = tensor[:, :, None, None]
        tensors.append(tensor)
    return torch.cat(tensors) if len(tensors) > 1 else tensors[0]
