"""`lora-convert`: rewrite an adapter from any layout lora-cli reads into the kohya/LyCORIS or diffusers/peft
key layout of its architecture, exactly (layouts diffusers converts come with alpha folded in)."""

from __future__ import annotations

from pathlib import Path

from lora_cli.adapters.files import FileFormat, read_adapter_standalone, write_adapter
from lora_cli.adapters.layouts import DIFFUSERS_METADATA_KEY
from lora_cli.errors import AdapterError

DROPPED_METADATA = ("lora_cli.format", DIFFUSERS_METADATA_KEY, "peft_config")


def convert(path: Path, out: Path, to: FileFormat, base: str | None = None, allow_pickle: bool = False) -> int:
    """Write `path` in layout `to`; returns the number of layers. Kohya files without lora-cli's metadata need
    the base (`base`: anything `--base` takes) to spell their module names."""
    if out.exists():
        raise AdapterError(f"{out} already exists; choose a new file (nothing is overwritten)")
    if base is None:
        file = read_adapter_standalone(path)
    else:
        from lora_cli.adapters.catalog import ModuleCatalog
        from lora_cli.adapters.files import read_adapter
        from lora_cli.models.weights import open_base_weights

        with open_base_weights(base, "--base", allow_pickle) as weights:
            file = read_adapter(path, ModuleCatalog.from_weights(weights))
    refused = file.algorithm.layout_refusal(to)
    if refused:
        raise AdapterError(f"{path}: {refused}")
    ranks = {key: file.algorithm.rank_from_file(named) for key, named in file.tensors.items()}
    kept = {k: v for k, v in file.metadata.items() if k not in DROPPED_METADATA}
    kept.setdefault("lora_cli.base_architecture", file.architecture.name)
    write_adapter(out, file.tensors, ranks, file.algorithm, to, file.architecture, kept)
    return len(file.tensors)
