"""`lora-merge`: fold adapters into a base's weights, streaming tensor by tensor.

Each targeted weight is merged in float32 (W + weight · delta for every adapter in order, DoRA renormalised),
checked to be finite and cast back to its original dtype; every other tensor is copied unchanged. Adapter
layers are matched against the base's safetensors headers, so no model is instantiated and peak memory stays
near the largest tensor.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from datasets_tools.scan import file_digest
from lora_cli.adapters.functional import merged_weight
from lora_cli.errors import AdapterError, ModelLoadError, OutputExistsError
from lora_cli.io.adapter_file import read_adapter
from lora_cli.io.atomic import atomic_directory
from lora_cli.io.keys import KohyaTable, ModuleKey, kohya_module_index
from lora_cli.io.safetensors_file import PICKLE_SUFFIXES, read_header
from lora_cli.io.safetensors_stream import stream_rewrite

WEIGHT = ".weight"


@dataclass
class MergeResult:
    out: Path
    merged_layers: int
    unmatched: dict[str, list[str]] = field(default_factory=dict)


def merge_adapters(
    base: Path, adapters: list[tuple[Path, float]], out: Path, allow_partial: bool = False
) -> MergeResult:
    """Write BASE with the adapters folded in to OUT (a new diffusers folder, written atomically)."""
    base, out = Path(base), Path(out)
    _check_paths(base, out)
    files, table = weight_files(base)
    index = kohya_module_index(_modules(files), table)
    plan: dict[ModuleKey, list[tuple[Path, dict, float]]] = {}
    result = MergeResult(out, 0)
    records = []
    for path, weight in adapters:
        unmatched: list[str] = []
        _, tensors, _ = read_adapter(path, index, unmatched if allow_partial else None)
        if unmatched:
            result.unmatched[str(path)] = unmatched
        for key, named in tensors.items():
            plan.setdefault(key, []).append((path, named, weight))
        records.append({"file": path.name, "sha256": file_digest(path), "weight": weight, "layers": len(tensors)})
    metadata = {"lora_cli.merged": json.dumps(records)}
    rewritten = {path.resolve() for paths in files.values() for path in paths}

    def skip(folder: str, names: list[str]) -> set[str]:
        return {n for n in names if n.startswith(".") or (Path(folder) / n).resolve() in rewritten}

    with atomic_directory(out) as tmp:
        shutil.copytree(base, tmp, dirs_exist_ok=True, ignore=skip)
        for component, paths in files.items():
            for source in paths:
                target = tmp / source.relative_to(base)
                target.parent.mkdir(parents=True, exist_ok=True)
                merger = _merger(component, plan, result)
                wanted = lambda name, c=component: name.endswith(WEIGHT) and (c, name[: -len(WEIGHT)]) in plan  # noqa: E731
                stream_rewrite(source, target, merger, wanted, metadata, ModelLoadError)
    return result


def _merger(component: str, plan: dict[ModuleKey, list], result: MergeResult):
    def transform(name: str, tensor: torch.Tensor) -> torch.Tensor:
        key = (component, name[: -len(WEIGHT)]) if name.endswith(WEIGHT) else None
        if key not in plan:
            return tensor
        merged = tensor.float()
        for path, named, weight in plan[key]:
            try:
                merged = merged_weight(merged, named, strength=weight)
            except RuntimeError:
                shapes = {n: tuple(t.shape) for n, t in named.items() if n != "alpha"}
                raise AdapterError(
                    f"{path}: layer {key[1]} has shape {tuple(tensor.shape)} in the base but the adapter has {shapes}"
                ) from None
            if not torch.isfinite(merged).all():
                raise AdapterError(
                    f"{path}: merging makes {key[1]} non-finite; the adapter is damaged or its weight too large"
                )
        result.merged_layers += 1
        return merged.to(tensor.dtype)

    return transform


def _check_paths(base: Path, out: Path) -> None:
    if base.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelLoadError(f"{base}: pickle-based checkpoints can run code; convert it to .safetensors first")
    if base.is_file():
        raise ModelLoadError(
            f"{base}: merging into single-file checkpoints is not supported yet; give a diffusers folder "
            "(diffusers' StableDiffusionPipeline.from_single_file(...).save_pretrained(...) makes one)"
        )
    if not (base / "model_index.json").is_file():
        raise ModelLoadError(f"{base}: not a diffusers pipeline folder (no model_index.json)")
    if out.exists():
        raise OutputExistsError(f"{out} already exists; choose a new output folder (nothing is ever overwritten)")
    if out.resolve() == base.resolve():
        raise OutputExistsError(f"{out}: the output must not be the base itself")


def weight_files(base: Path) -> tuple[dict[str, list[Path]], KohyaTable]:
    from lora_cli.models import ARCHITECTURES

    class_name = json.loads((base / "model_index.json").read_text())["_class_name"]
    architecture = next((a for a in ARCHITECTURES if a.matches(class_name)), None)
    if architecture is None:
        raise ModelLoadError(f"{base}: lora-merge cannot merge into a {class_name} yet")
    files = {
        component: sorted((base / component).glob("*.safetensors"))
        for component in architecture.kohya_table
        if (base / component).is_dir()
    }
    if not any(files.values()):
        raise ModelLoadError(f"{base}: no .safetensors weights found (pickle .bin weights are refused)")
    return files, architecture.kohya_table


def base_weight_shapes(base: Path) -> tuple[dict[ModuleKey, tuple[int, ...]], KohyaTable]:
    """Shape of every module's weight per (component, module) of a diffusers folder, from safetensors headers."""
    if not (Path(base) / "model_index.json").is_file():
        raise ModelLoadError(f"{base}: not a diffusers pipeline folder (no model_index.json)")
    files, table = weight_files(Path(base))
    return {key: shape for component, paths in files.items() for key, shape in _shapes(component, paths)}, table


def _modules(files: dict[str, list[Path]]) -> dict[str, list[str]]:
    return {
        component: sorted(module for (_, module), _ in _shapes(component, paths)) for component, paths in files.items()
    }


def _shapes(component: str, paths: list[Path]) -> list[tuple[ModuleKey, tuple[int, ...]]]:
    found = []
    for path in paths:
        header = read_header(path, ModelLoadError)
        found += [((component, k[: -len(WEIGHT)]), tuple(v["shape"])) for k, v in header.items() if k.endswith(WEIGHT)]
    return found
