"""Adapter `.safetensors` files in kohya or diffusers layout: writing atomically, reading with format detection."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from lora_cli.adapters.registry import AdapterAlgorithm, detect_algorithm, get_algorithm
from lora_cli.errors import AdapterError
from lora_cli.io.keys import (
    AdapterTensors,
    KohyaTable,
    ModuleKey,
    from_diffusers,
    from_kohya,
    to_diffusers,
    to_kohya,
)
from lora_cli.io.safetensors_file import load_tensors, save_tensors

FileFormat = Literal["kohya", "diffusers"]
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # where diffusers' loader looks for rank/alpha


def save_adapter(
    path: str | Path,
    tensors: AdapterTensors,
    ranks: dict[ModuleKey, int],
    algorithm: AdapterAlgorithm,
    file_format: FileFormat,
    kohya_table: KohyaTable,
    metadata: dict[str, str],
) -> None:
    """Write the adapter atomically in the requested key layout, with `metadata` in the header.

    `tensors` are in peft's convention; the kohya layout applies the algorithm's file convention
    (LyCORIS `dora_scale` shapes, LoKr scale folding) so A1111/ComfyUI compute the same update."""
    metadata = {**metadata, "lora_cli.format": file_format}
    if file_format == "kohya":
        exported = {key: algorithm.to_file(named, float(named["alpha"]), ranks[key]) for key, named in tensors.items()}
        flat = to_kohya(exported, kohya_table)
    else:
        peft_names = {file: peft for peft, file in algorithm.tensor_names.items()}
        flat = to_diffusers({key: _peft_magnitude(named) for key, named in tensors.items()}, peft_names)
        metadata[DIFFUSERS_METADATA_KEY] = json.dumps(_diffusers_adapter_config(tensors), sort_keys=True)
    save_tensors(path, flat, metadata)


def read_adapter(
    path: str | Path, kohya_index: dict[str, ModuleKey], unmatched: list[str] | None = None
) -> tuple[AdapterAlgorithm, AdapterTensors, dict[str, str]]:
    """Read an adapter in either layout: its algorithm (from the tensor names), tensors in the internal
    namespace (alpha restored for diffusers files) and metadata. Layers matching nothing in the base are an
    error unless `unmatched` is given to collect them."""
    flat, metadata = load_tensors(path, AdapterError)
    if not flat:
        raise AdapterError(f"{path}: the file holds no tensors")
    if any(key.startswith("lora_") for key in flat):
        tensors = from_kohya(flat, kohya_index, str(path), unmatched)
        names = {name for named in tensors.values() for name in named}
        if not tensors:
            raise AdapterError(f"{path}: no adapter layer matches this base")
        algorithm = detect_algorithm(names, str(path))
        _check_complete(algorithm, tensors, path)
        return algorithm, tensors, metadata
    algorithm = get_algorithm("lora")  # the diffusers/peft layout holds LoRA/LoCon only
    tensors = from_diffusers(flat, algorithm.tensor_names, set(kohya_index.values()), str(path), unmatched)
    if not tensors:
        raise AdapterError(f"{path}: no adapter layer matches this base")
    _check_complete(algorithm, tensors, path)
    _restore_alpha(tensors, metadata)
    return algorithm, tensors, metadata


def _peft_magnitude(named: dict) -> dict:
    """peft stores a DoRA magnitude as (out,) for Linear and (1, out, 1, 1) for Conv2d."""
    if "dora_scale" not in named:
        return named
    conv = named["lora_down.weight"].dim() == 4
    return {**named, "dora_scale": named["dora_scale"].reshape((1, -1, 1, 1) if conv else (-1,))}


def _check_complete(algorithm: AdapterAlgorithm, tensors: AdapterTensors, path: str | Path) -> None:
    for (_, module), named in tensors.items():
        if not algorithm.complete(set(named)):
            raise AdapterError(f"{path}: layer {module} is incomplete (has only {', '.join(sorted(named))})")


def _diffusers_adapter_config(tensors: AdapterTensors) -> dict[str, object]:
    """peft LoraConfig fields per component, prefixed the way diffusers' `save_lora_weights` writes them."""
    config: dict[str, object] = {}
    for component in sorted({c for c, _ in tensors}):
        modules = {m: named for (c, m), named in tensors.items() if c == component}
        ranks = {m: int(named["lora_down.weight"].shape[0]) for m, named in modules.items()}
        alphas = {m: float(named["alpha"]) for m, named in modules.items()}
        rank = max(set(ranks.values()), key=list(ranks.values()).count)
        alpha = max(set(alphas.values()), key=list(alphas.values()).count)
        config[f"{component}.r"] = rank
        config[f"{component}.lora_alpha"] = alpha
        config[f"{component}.target_modules"] = sorted(modules)
        config[f"{component}.rank_pattern"] = {m: r for m, r in ranks.items() if r != rank}
        config[f"{component}.alpha_pattern"] = {m: a for m, a in alphas.items() if a != alpha}
        config[f"{component}.use_dora"] = any("dora_scale" in named for named in modules.values())
    return config


def _restore_alpha(tensors: AdapterTensors, metadata: dict[str, str]) -> None:
    import torch

    try:
        config = json.loads(metadata.get(DIFFUSERS_METADATA_KEY, "{}"))
    except json.JSONDecodeError:
        config = {}
    for (component, module), named in tensors.items():
        rank = named["lora_down.weight"].shape[0]
        pattern = config.get(f"{component}.alpha_pattern") or {}
        alpha = pattern.get(module, config.get(f"{component}.lora_alpha", rank))
        named["alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
