"""Write a diffusers Stable Diffusion folder as one single-file checkpoint (the layout A1111 and ComfyUI load)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from lora_cli.errors import ModelLoadError
from lora_cli.io.safetensors_stream import PlannedTensor, TensorReader, open_readers, tensor_bytes, write_streamed
from lora_cli.models.single_file import Placement, layout_for_folder, to_single_file
from lora_cli.models.weights import BaseWeights, open_base_weights, place

ParameterTransform = Callable[[str, str, torch.Tensor], torch.Tensor]


def write_single_file(
    folder: Path, out: Path, metadata: dict[str, str], transform: ParameterTransform | None = None
) -> None:
    """Stream every component's weights of a pipeline folder into `out`, passing each tensor through
    `transform(component, file_key, tensor)` first (a merge, for example)."""
    with open_base_weights(str(folder), str(folder)) as weights:
        _write(weights, out, metadata, transform)


def _write(weights: BaseWeights, out: Path, metadata: dict[str, str], transform: ParameterTransform | None) -> None:
    folder = weights.path
    layout = layout_for_folder(weights.source.pipeline_class, _config(folder / "text_encoder"))
    sources: list[tuple[str, Path]] = []
    for component in layout.prefixes():
        paths = weights.files.get(component, [])
        if not paths:
            raise ModelLoadError(f"{folder}: component {component} has no .safetensors weights to write")
        sources += [(component, path) for path in paths]
    with open_readers([path for _, path in sources], ModelLoadError) as readers:
        planned: dict[str, list[tuple[Placement, str, str, TensorReader]]] = {}
        for (component, _), reader in zip(sources, readers, strict=True):
            for name, placement in to_single_file(layout, component, reader.names()).items():
                planned.setdefault(placement.key, []).append((placement, component, name, reader))
        tensors = [_planned(key, parts, transform) for key, parts in planned.items()]
        write_streamed(out, tensors, metadata)


def _planned(
    key: str, parts: list[tuple[Placement, str, str, TensorReader]], transform: ParameterTransform | None
) -> PlannedTensor:
    first_placement, _, first_name, first_reader = parts[0]
    entry = first_reader.header[first_name]
    shape = list(entry["shape"])
    if first_placement.part is not None:
        if len(parts) != 3:
            raise ModelLoadError(f"{key}: expected q, k and v projections, found {len(parts)}")
        shape[0] *= 3
    if first_placement.transposed:
        shape.reverse()
    if first_placement.conv and len(shape) == 2:
        shape += [1, 1]

    def produce() -> bytes:
        tensors = []
        for placement, component, name, reader in parts:
            tensor = reader.tensor(name)
            tensors.append((placement, transform(component, name, tensor) if transform else tensor))
        return tensor_bytes(place(tensors))

    return PlannedTensor(key, entry["dtype"], shape, produce)


def _config(component_folder: Path) -> dict:
    path = component_folder / "config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        raise ModelLoadError(f"{path} is damaged (not JSON)") from None
