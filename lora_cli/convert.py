"""`lora-convert`: rewrite an adapter between the kohya/LyCORIS and diffusers/peft key layouts, exactly."""

from __future__ import annotations

import json
from pathlib import Path

from lora_cli.errors import AdapterError
from lora_cli.io.adapter_file import DIFFUSERS_METADATA_KEY, FileFormat, read_adapter, save_adapter
from lora_cli.io.keys import kohya_module_index
from lora_cli.io.safetensors_file import read_header
from lora_cli.models.stable_diffusion import StableDiffusion


def convert(path: Path, out: Path, to: FileFormat, base: Path | None = None) -> int:
    """Write `path` in layout `to`; returns the number of layers. Kohya files need the module names, from
    `base` or from lora-cli's `lora_cli.targets` metadata."""
    if out.exists():
        raise AdapterError(f"{out} already exists; choose a new file (nothing is overwritten)")
    table = StableDiffusion.kohya_table
    index = kohya_module_index(_module_names(path, base), table)
    algorithm, tensors, metadata = read_adapter(path, index)
    if to == "diffusers" and algorithm.name != "lora":
        raise AdapterError(f"{path}: the diffusers layout holds LoRA/LoCon only, not {algorithm.name}")
    ranks = {key: algorithm.rank_from_file(named) for key, named in tensors.items()}
    kept = {k: v for k, v in metadata.items() if k not in ("lora_cli.format", DIFFUSERS_METADATA_KEY)}
    save_adapter(out, tensors, ranks, algorithm, to, table, kept)
    return len(tensors)


def _module_names(path: Path, base: Path | None) -> dict[str, list[str]]:
    header = read_header(path, AdapterError)
    keys = [key for key in header if key != "__metadata__"]
    if not any(key.startswith("lora_") for key in keys):  # diffusers layout: the keys carry the module paths
        modules: dict[str, list[str]] = {}
        for key in keys:
            component, _, rest = key.partition(".")
            module = rest.rsplit(".lora_", 1)[0]
            modules.setdefault(component, []).append(module)
        return modules
    if base is not None:
        from lora_cli.models.weights import open_base_weights

        return open_base_weights(base).modules()
    targets = (header.get("__metadata__") or {}).get("lora_cli.targets")
    if targets is None:
        raise AdapterError(f"{path}: kohya keys do not spell module names unambiguously; pass --base FOLDER")
    return json.loads(targets)
