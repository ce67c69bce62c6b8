"""A base's tensors on disk, seen by component and by the parameter names the loaded modules use.

Everything here reads safetensors headers and single tensors, never a whole model: merging, extraction,
`lora-info --base` and the memory planner work at the size of the largest tensor. Names are those of the
loaded models (a checkpoint saved by an older transformers spells CLIP's parameters `text_model.…`, the
model of transformers 5 does not), so what these commands match is what training and sampling match.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from lora_cli.errors import ModelLoadError
from lora_cli.io.safetensors_file import read_header
from lora_cli.io.safetensors_stream import open_readers
from lora_cli.models.single_file import Placement, SingleFileLayout, detect_layout, from_single_file
from lora_cli.models.source import BaseSource, open_base_source

WEIGHT = ".weight"
ModuleKey = tuple[str, str]  # (component, module path)


@dataclass(frozen=True)
class StoredTensor:
    """One parameter of a component: its shape and dtype as loaded, and where its data lives."""

    shape: tuple[int, ...]
    dtype: str  # safetensors dtype code: F32, F16, BF16, ...
    file: Path
    file_key: str
    placement: Placement | None = None  # single files: where in a (possibly fused or transposed) file tensor


@dataclass
class BaseWeights:
    """Every stored parameter of a base by component and parameter name."""

    source: BaseSource
    tensors: dict[str, dict[str, StoredTensor]]
    files: dict[str, list[Path]] = field(default_factory=dict)  # a folder's weight files per component
    layout: SingleFileLayout | None = None  # a single file's family

    @property
    def path(self) -> Path:
        return self.source.location

    @property
    def is_single_file(self) -> bool:
        return self.layout is not None

    def module_shapes(self, components: list[str] | None = None) -> dict[ModuleKey, tuple[int, ...]]:
        """Weight shapes of the modules an adapter can change (2-D and 4-D `.weight` tensors)."""
        return {
            (component, name[: -len(WEIGHT)]): stored.shape
            for component, named in self.tensors.items()
            if components is None or component in components
            for name, stored in named.items()
            if name.endswith(WEIGHT) and len(stored.shape) in (2, 4)
        }

    def adaptable_shapes(self) -> dict[ModuleKey, tuple[int, ...]]:
        """Module shapes of the components adapters are trained on (the denoiser and text encoders)."""
        return self.module_shapes(list(self.source.architecture.kohya_table))

    def parameter_of(self, component: str, file_key: str) -> str | None:
        """The parameter name a folder's file key holds (None if the component does not load it)."""
        return self._by_file_key.get(component, {}).get(file_key)

    def read_weight(self, key: ModuleKey) -> torch.Tensor:
        """One module's weight, oriented as the loaded module holds it."""
        component, module = key
        stored = self.tensors[component][module + WEIGHT]
        with open_readers([stored.file], ModelLoadError) as (reader,):
            tensor = reader.tensor(stored.file_key)
        return unplace(tensor, stored.placement) if stored.placement is not None else tensor

    @cached_property
    def _by_file_key(self) -> dict[str, dict[str, str]]:
        return {
            component: {stored.file_key: name for name, stored in named.items()}
            for component, named in self.tensors.items()
        }


@contextmanager
def open_base_weights(text: str | Path, where: str, allow_pickle: bool = False) -> Iterator[BaseWeights]:
    """The stored parameters of the base `text` names (anything `open_base_source` resolves)."""
    with open_base_source(text, where, allow_pickle=allow_pickle) as source:
        yield read_weights(source)


def read_weights(source: BaseSource) -> BaseWeights:
    """The stored parameters of a resolved base (folder or single file)."""
    return _single_file(source) if source.is_single_file else _folder(source)


def _folder(source: BaseSource) -> BaseWeights:
    folder = source.location
    declared = json.loads((folder / "model_index.json").read_text())
    tensors: dict[str, dict[str, StoredTensor]] = {}
    files: dict[str, list[Path]] = {}
    for component, value in declared.items():
        paths = component_files(folder / component, source.variant) if isinstance(value, list) else []
        if not paths:
            continue
        renames = checkpoint_renames(value, folder / component)
        named: dict[str, StoredTensor] = {}
        for path in paths:
            header = read_header(path, ModelLoadError)
            header.pop("__metadata__", None)
            for key, entry in header.items():
                named[_renamed(key, renames)] = StoredTensor(tuple(entry["shape"]), entry["dtype"], path, key)
        tensors[component], files[component] = named, paths
    if not tensors:
        raise ModelLoadError(f"{folder}: no .safetensors weights found (pickle .bin weights are refused)")
    return BaseWeights(source, tensors, files=files)


def component_files(folder: Path, variant: str | None = None) -> list[Path]:
    """One set of a component's weight files (shards included): the requested variant's
    (`model.fp16.safetensors`), else the plain ones, else those of the only or first variant there is."""
    by_variant: dict[str, list[Path]] = {}
    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        stem_parts = path.name.split(".")
        by_variant.setdefault(stem_parts[1] if len(stem_parts) > 2 else "", []).append(path)
    if not by_variant:
        return []
    return by_variant.get(variant or "") or by_variant.get("") or by_variant[min(by_variant)]


def checkpoint_renames(declared: list, component_folder: Path) -> list[tuple[re.Pattern, str]]:
    """How transformers renames this component's checkpoint keys into its parameter names when it loads them
    (its checkpoint conversion mapping; e.g. CLIPTextModel drops `text_model.`). Renames only: a component
    whose loading fuses or splits tensors has none here."""
    library, class_name = (declared + [None, None])[:2]
    if library != "transformers" or class_name is None:
        return []
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    mapping = get_checkpoint_conversion_mapping(class_name) or get_checkpoint_conversion_mapping(
        _model_type(component_folder)
    )
    renames = []
    for transform in mapping or []:
        if not isinstance(transform, WeightRenaming):
            continue
        for pattern, target in zip(transform.source_patterns, transform.target_patterns, strict=False):
            renames.append((re.compile(pattern), target))
    return renames


def _model_type(component_folder: Path) -> str | None:
    try:
        return json.loads((component_folder / "config.json").read_text()).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def _renamed(key: str, renames: list[tuple[re.Pattern, str]]) -> str:
    for pattern, target in renames:
        key = pattern.sub(target, key, count=1)
    return key


def _single_file(source: BaseSource) -> BaseWeights:
    path = source.location
    header = read_header(path, ModelLoadError)
    header.pop("__metadata__", None)
    layout = detect_layout(header, str(path))
    tensors: dict[str, dict[str, StoredTensor]] = {}
    for file_key, held in from_single_file(layout, list(header)).items():
        entry = header[file_key]
        for component, name, placement in held:
            shape = placed_shape(entry["shape"], placement)
            tensors.setdefault(component, {})[name] = StoredTensor(shape, entry["dtype"], path, file_key, placement)
    return BaseWeights(source, tensors, layout=layout)


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
