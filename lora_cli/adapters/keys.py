"""The internal adapter namespace and the two layouts lora-cli writes.

Internally an adapter is `{(component, module_path): {tensor_name: tensor}}` with kohya/LyCORIS tensor names
(`lora_down.weight`, `lora_up.weight`, `alpha`); module paths are those of the loaded modules. Writing refuses
two tensors under one file key, so a naming clash is an error instead of a silently partial adapter; reading
is `lora_cli.adapters.files`'s job.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lora_cli.errors import AdapterError

if TYPE_CHECKING:
    import torch

    from lora_cli.models.naming import KohyaTable

ModuleKey = tuple[str, str]
AdapterTensors = dict[ModuleKey, dict[str, "torch.Tensor"]]
# The key layouts training writes (`output.format`); `lora-convert --to original` also writes an architecture's own
# fused module names (HunyuanVideo's, the only ones ComfyUI maps for it).
FILE_FORMATS = ("kohya", "diffusers")


def to_kohya(tensors: AdapterTensors, table: KohyaTable) -> dict[str, torch.Tensor]:
    """`lora_unet_down_blocks_0_..._to_q.lora_down.weight` style keys (A1111, ComfyUI, kohya)."""
    flat: dict[str, torch.Tensor] = {}
    for (component, module), named in tensors.items():
        stem = table[component].stem(module)
        for name, value in named.items():
            _put(flat, f"{stem}.{name}", value)
    return flat


def from_kohya(
    flat: dict[str, torch.Tensor], table: KohyaTable, targets: dict[str, list[str]], source: str
) -> AdapterTensors:
    """Inverse of `to_kohya` for the modules in `targets` (a checkpoint of a known run): every key must match."""
    index = {table[c].stem(m): (c, m) for c, modules in targets.items() for m in modules}
    tensors: AdapterTensors = {}
    for key, value in flat.items():
        stem, _, name = key.partition(".")
        if stem not in index:
            raise AdapterError(f"{source}: layer {stem} is not one of this run's adapter layers")
        tensors.setdefault(index[stem], {})[name] = value
    return tensors


def to_diffusers(tensors: AdapterTensors, peft_names: dict[str, str]) -> dict[str, torch.Tensor]:
    """`unet.<module>.lora_A.weight` style keys (diffusers' `load_lora_weights`); alpha goes to metadata."""
    flat: dict[str, torch.Tensor] = {}
    for (component, module), named in tensors.items():
        for name, value in named.items():
            if name != "alpha":
                _put(flat, f"{component}.{module}.{peft_names[name]}", value)
    return flat


def _put(flat: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    if key in flat:
        raise AdapterError(f"two adapter tensors map to the same file key {key}")
    flat[key] = value
