"""`lora-merge`: fold adapters into a base's weights, streaming tensor by tensor.

Each targeted weight is merged in float32 (W + weight · delta for every adapter in order, DoRA renormalised),
checked to be finite and cast back to its original dtype; every other tensor is copied unchanged. Adapter
layers are matched against the safetensors headers of the base (a diffusers folder or a single-file
checkpoint), so no model is instantiated and peak memory stays near the largest tensor.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from datasets_tools.scan import file_digest
from lora_cli.adapters.catalog import ModuleCatalog
from lora_cli.adapters.files import PEFT_WEIGHTS, read_adapter
from lora_cli.adapters.functional import delta_weight, merged_weight
from lora_cli.adapters.keys import ModuleKey
from lora_cli.errors import AdapterError, ModelLoadError, OutputExistsError
from lora_cli.io.atomic import atomic_directory
from lora_cli.io.pickle_file import as_safetensors
from lora_cli.io.safetensors_stream import stream_rewrite
from lora_cli.models.quantize import hidden_by_quantization, hidden_warning, trained_quantized
from lora_cli.models.single_file import Placement
from lora_cli.models.single_file_writer import write_single_file
from lora_cli.models.source import open_base_source
from lora_cli.models.weights import WEIGHT, BaseWeights, read_weights, unplace


@dataclass
class MergeResult:
    out: Path
    merged_layers: int
    unmatched: dict[str, list[str]] = field(default_factory=dict)
    # adapters trained on a quantized base: (mode, layers whose change is below the quantization error, layers)
    quantization: dict[str, list] = field(default_factory=dict)

    def warnings(self) -> list[str]:
        lines = [
            f"{a}: {len(layers)} layer(s) matched nothing and were skipped" for a, layers in self.unmatched.items()
        ]
        for adapter, (mode, hidden, total) in self.quantization.items():
            if hidden:
                lines.append(hidden_warning(adapter, hidden, total, mode))
        return lines


Plan = dict[ModuleKey, list[tuple[Path, dict, float]]]


def merge_adapters(
    base: str | Path,
    adapters: list[tuple[Path, float]],
    out: Path,
    allow_partial: bool = False,
    allow_pickle: bool = False,
) -> MergeResult:
    """Write BASE with the adapters folded in to OUT, atomically. BASE is anything `--base` takes (a diffusers
    folder, a single file, builtin:NAME, a hub id); a folder gives a folder, or a single file when OUT ends in
    `.safetensors`; a single-file checkpoint gives a single file. Pickle files are refused unless
    `allow_pickle` (then read with restricted unpickling)."""
    out = Path(out)
    if out.exists():
        raise OutputExistsError(f"{out} already exists; choose a new output path (nothing is ever overwritten)")
    with (
        open_base_source(str(base), "BASE", allow_pickle=allow_pickle) as source,
        as_safetensors([path for path, _ in adapters], allow_pickle, out.parent) as adapter_files,
    ):
        if out.resolve() == source.location.resolve():
            raise OutputExistsError(f"{out}: the output must not be the base itself")
        readable = [(file, weight, original) for file, (original, weight) in zip(adapter_files, adapters, strict=True)]
        return _merge(read_weights(source), readable, out, allow_partial)


def _merge(
    weights: BaseWeights, adapters: list[tuple[Path, float, Path]], out: Path, allow_partial: bool
) -> MergeResult:
    """The merge itself; each adapter is (file to read, weight, the user's path for messages and records)."""
    if weights.is_single_file and out.suffix.lower() != ".safetensors":
        raise OutputExistsError(f"{out}: the base is a single file, so OUT must be a .safetensors file too")
    catalog = ModuleCatalog.from_weights(weights)
    plan: Plan = {}
    result = MergeResult(out, 0)
    records = []
    for path, weight, original in adapters:
        file = read_adapter(path, catalog, allow_partial)
        if file.unmatched:
            result.unmatched[str(original)] = file.unmatched
        mode = trained_quantized(file.metadata)
        if mode is not None:
            result.quantization[str(original)] = [mode, 0, len(file.tensors)]
        for key, named in file.tensors.items():
            plan.setdefault(key, []).append((original, named, weight))
        record = {"file": original.name, "sha256": _digest(path), "weight": weight, "layers": len(file.tensors)}
        records.append(record)
    metadata = {"lora_cli.merged": json.dumps(records)}
    merger = _Merger(plan, result, weights)
    if weights.is_single_file:
        _merge_single_file(weights, merger, out, metadata)
    elif out.suffix.lower() == ".safetensors":
        write_single_file(weights.path, out, metadata, merger.file_transform)
    else:
        _merge_folder(weights, merger, out, metadata)
    return result


def _digest(path: Path) -> str:
    """sha256 of an adapter file (of a peft folder: of its weights)."""
    return file_digest(path / PEFT_WEIGHTS if path.is_dir() else path)


class _Merger:
    """Folds the planned adapter layers into weights: float32, in adapter order, checked finite."""

    def __init__(self, plan: Plan, result: MergeResult, weights: BaseWeights) -> None:
        self.plan, self.result, self.weights = plan, result, weights

    def wanted(self, component: str, file_key: str) -> bool:
        return self._module(component, file_key) in self.plan

    def file_transform(self, component: str, file_key: str, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` (stored under `file_key` in `component`'s files) with the adapters merged, in its dtype."""
        key = self._module(component, file_key)
        if key not in self.plan:
            return tensor
        return self.merge(key, tensor.float()).to(tensor.dtype)

    def _module(self, component: str, file_key: str) -> ModuleKey | None:
        name = self.weights.parameter_of(component, file_key)
        return (component, name[: -len(WEIGHT)]) if name is not None and name.endswith(WEIGHT) else None

    def merge(self, key: ModuleKey, merged: torch.Tensor) -> torch.Tensor:
        original_shape = tuple(merged.shape)
        for path, named, weight in self.plan[key]:
            self._check_quantization(str(path), merged, named, weight)
            try:
                merged = merged_weight(merged, named, strength=weight)
            except RuntimeError:
                shapes = {n: tuple(t.shape) for n, t in named.items() if n != "alpha"}
                raise AdapterError(
                    f"{path}: layer {key[1]} has shape {original_shape} in the base but the adapter has {shapes}"
                ) from None
            if not torch.isfinite(merged).all():
                raise AdapterError(
                    f"{path}: merging makes {key[1]} non-finite; the adapter is damaged or its weight too large"
                )
        self.result.merged_layers += 1
        return merged

    def _check_quantization(self, adapter: str, weight: torch.Tensor, named: dict, strength: float) -> None:
        record = self.result.quantization.get(adapter)
        if record is not None and weight.dim() == 2:
            delta = delta_weight(named, weight.shape) * strength
            record[1] += hidden_by_quantization(weight, delta, record[0])


def _merge_folder(weights: BaseWeights, merger: _Merger, out: Path, metadata: dict[str, str]) -> None:
    base = weights.path
    rewritten = {path.resolve() for paths in weights.files.values() for path in paths}

    def skip(folder: str, names: list[str]) -> set[str]:
        return {n for n in names if n.startswith(".") or (Path(folder) / n).resolve() in rewritten}

    with atomic_directory(out) as tmp:
        shutil.copytree(base, tmp, dirs_exist_ok=True, ignore=skip)
        for component, paths in weights.files.items():
            for source in paths:
                target = tmp / source.relative_to(base)
                target.parent.mkdir(parents=True, exist_ok=True)
                stream_rewrite(
                    source,
                    target,
                    lambda name, tensor, c=component: merger.file_transform(c, name, tensor),
                    lambda name, c=component: merger.wanted(c, name),
                    metadata,
                    ModelLoadError,
                )


def _merge_single_file(weights: BaseWeights, merger: _Merger, out: Path, metadata: dict[str, str]) -> None:
    held: dict[str, list[tuple[ModuleKey, Placement]]] = {}
    for component, named in weights.tensors.items():
        for name, stored in named.items():
            key = (component, name.removesuffix(WEIGHT))
            if name.endswith(WEIGHT) and key in merger.plan:
                held.setdefault(stored.file_key, []).append((key, stored.placement))

    def transform(name: str, tensor: torch.Tensor) -> torch.Tensor:
        (key, placement), *others = held[name]
        if not others and placement == Placement(placement.key):  # stored as in diffusers: no copy needed
            return merger.merge(key, tensor.float()).to(tensor.dtype)
        merged = tensor.float().clone()
        for key, placement in held[name]:
            part = unplace(merged, placement)
            part.copy_(merger.merge(key, part.clone()))
        return merged.to(tensor.dtype)

    stream_rewrite(weights.path, out, transform, lambda name: name in held, metadata, ModelLoadError)
