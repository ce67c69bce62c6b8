"""A base model's tensors (name, shape, dtype) by component, read from safetensors headers only.

The planner needs every tensor of every component, VAE included, so it reads the headers itself rather than
through `open_base_weights` (which keeps only the adaptable components' module weights).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from lora_cli.config.schema import ModelSection
from lora_cli.errors import ModelLoadError
from lora_cli.io.safetensors_file import PICKLE_SUFFIXES, read_header

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
TORCH_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_SHARD = re.compile(r"-\d{5}-of-\d{5}$")


@dataclass(frozen=True)
class Weight:
    """One stored tensor, named as diffusers/transformers name it inside its component."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype code: F32, F16, BF16, ...

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class BaseInventory:
    """Every tensor of a base by component."""

    pipeline_class: str
    components: dict[str, tuple[Weight, ...]]

    def parameters(self, component: str) -> int:
        return sum(weight.numel for weight in self.components.get(component, ()))

    def layer_shapes(self, component: str) -> dict[str, tuple[int, ...]]:
        """Module name -> weight shape of the layers (2-D or 4-D `.weight` tensors) of a component."""
        return {
            w.name.removesuffix(".weight"): w.shape
            for w in self.components.get(component, ())
            if w.name.endswith(".weight") and len(w.shape) in (2, 4)
        }


def read_inventory(spec: ModelSection) -> BaseInventory:
    """The inventory of `model.path`: a diffusers folder, a single `.safetensors` file, `builtin:NAME`, or a hub
    id already in the local Hugging Face cache (only headers are read, never tensor data)."""
    from lora_cli.models.source import local_location

    location = local_location(spec)
    if location is None:
        location = _cached_snapshot(spec)
    if location.is_file() and location.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelLoadError(
            f"model.path: {location} is a pickle checkpoint; the memory plan reads safetensors headers only, "
            "so convert it to .safetensors first"
        )
    if location.is_file():
        return _single_file(location)
    return _folder(location, spec)


def _cached_snapshot(spec: ModelSection) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(spec.path, revision=spec.revision, local_files_only=True))
    except LocalEntryNotFoundError:
        raise ModelLoadError(
            f"model.path: {spec.path} is not in the local Hugging Face cache; the memory plan reads weight headers "
            f"from local files, so download it first (hf download {spec.path})"
        ) from None


def _folder(folder: Path, spec: ModelSection) -> BaseInventory:
    index = folder / "model_index.json"
    try:
        declared = json.loads(index.read_text())
        class_name = declared["_class_name"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise ModelLoadError(f"model.path: {index} is missing or damaged (not JSON with a _class_name)") from None
    components: dict[str, tuple[Weight, ...]] = {}
    for name, value in declared.items():
        files = _weight_files(folder / name, spec.variant) if isinstance(value, list) else []
        if not files:
            continue
        weights = []
        for file in files:
            header = read_header(file, ModelLoadError)
            header.pop("__metadata__", None)
            weights += [Weight(key, tuple(entry["shape"]), entry["dtype"]) for key, entry in header.items()]
        components[name] = tuple(weights)
    if not components:
        raise ModelLoadError(f"model.path: {folder} holds no .safetensors weights (pickle .bin weights are refused)")
    return BaseInventory(class_name, components)


def _weight_files(folder: Path, variant: str | None) -> list[Path]:
    """The component's safetensors files of the requested variant (`model.fp16.safetensors`), else the plain ones."""
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    by_variant: dict[str | None, list[Path]] = {}
    for file in files:
        stem = _SHARD.sub("", file.name.removesuffix(".safetensors"))
        by_variant.setdefault(stem.partition(".")[2] or None, []).append(file)
    return by_variant.get(variant) or by_variant.get(None) or []


def _single_file(path: Path) -> BaseInventory:
    from lora_cli.models.single_file import detect_layout, from_single_file
    from lora_cli.models.weights import placed_shape

    header = read_header(path, ModelLoadError)
    header.pop("__metadata__", None)
    layout = detect_layout(header, f"model.path: {path}")
    components: dict[str, list[Weight]] = {}
    for file_key, held in from_single_file(layout, list(header)).items():
        entry = header[file_key]
        for component, diffusers_key, placement in held:
            shape = placed_shape(entry["shape"], placement)
            components.setdefault(component, []).append(Weight(diffusers_key, shape, entry["dtype"]))
    frozen = {name: tuple(weights) for name, weights in components.items()}
    return BaseInventory(layout.pipeline_class, frozen)
