"""The internal adapter namespace and its conversion to the kohya and diffusers/peft file layouts.

Internally an adapter is `{(component, module_path): {tensor_name: tensor}}` with kohya/LyCORIS tensor
names (`lora_down.weight`, `lora_up.weight`, `alpha`). Conversions consume every key and refuse leftovers
or collisions, so a format mismatch is an error instead of a silently partial adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lora_cli.errors import AdapterError

ModuleKey = tuple[str, str]
AdapterTensors = dict[ModuleKey, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class KohyaComponent:
    """How kohya spells one component's module names: a prefix, then the dotted path with `_` for `.`."""

    prefix: str
    # A leading module-path part the prefix already spells (transformers 5 CLIP has no `text_model.` level).
    drop: str = ""

    def stem(self, module: str) -> str:
        return self.prefix + module.removeprefix(self.drop).replace(".", "_")


KohyaTable = dict[str, KohyaComponent]


def to_kohya(tensors: AdapterTensors, table: KohyaTable) -> dict[str, torch.Tensor]:
    """`lora_unet_down_blocks_0_..._to_q.lora_down.weight` style keys (A1111, ComfyUI, kohya)."""
    flat: dict[str, torch.Tensor] = {}
    for (component, module), named in tensors.items():
        stem = table[component].stem(module)
        for name, value in named.items():
            _put(flat, f"{stem}.{name}", value)
    return flat


def from_kohya(
    flat: dict[str, torch.Tensor],
    module_index: dict[str, ModuleKey],
    source: str,
    unmatched: list[str] | None = None,
) -> AdapterTensors:
    """Inverse of `to_kohya`, given `{kohya_stem: (component, module)}` built from the base's layers.
    Layers that match nothing are an error, unless an `unmatched` list is given to collect them."""
    tensors: AdapterTensors = {}
    missing: list[str] = []
    for key, value in flat.items():
        stem, _, name = key.partition(".")
        if stem not in module_index:
            missing.append(stem)
            continue
        named = tensors.setdefault(module_index[stem], {})
        if name in named:
            raise AdapterError(f"{source}: tensor {key} appears twice")
        named[name] = value
    return _check_unmatched(tensors, sorted(set(missing)), source, unmatched)


def _check_unmatched(
    tensors: AdapterTensors, missing: list[str], source: str, unmatched: list[str] | None
) -> AdapterTensors:
    if missing and unmatched is None:
        shown = ", ".join(missing[:3]) + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else "")
        raise AdapterError(f"{source}: {len(missing)} adapter layer(s) match nothing in the base, e.g. {shown}")
    if unmatched is not None:
        unmatched.extend(missing)
    return tensors


def kohya_module_index(modules: dict[str, list[str]], table: KohyaTable) -> dict[str, ModuleKey]:
    """`{kohya_stem: (component, module)}` for every candidate module of every component."""
    return {
        table[component].stem(module): (component, module) for component, names in modules.items() for module in names
    }


def to_diffusers(tensors: AdapterTensors, peft_names: dict[str, str]) -> dict[str, torch.Tensor]:
    """`unet.<module>.lora_A.weight` style keys (diffusers' `load_lora_weights`); alpha goes to metadata."""
    flat: dict[str, torch.Tensor] = {}
    for (component, module), named in tensors.items():
        for name, value in named.items():
            if name != "alpha":
                _put(flat, f"{component}.{module}.{peft_names[name]}", value)
    return flat


def from_diffusers(
    flat: dict[str, torch.Tensor],
    file_names: dict[str, str],
    modules: set[ModuleKey],
    source: str,
    unmatched: list[str] | None = None,
) -> AdapterTensors:
    """Inverse of `to_diffusers` (without alpha): `file_names` maps peft tensor suffixes to internal names;
    `modules` are the base's (component, module) pairs."""
    tensors: AdapterTensors = {}
    components = {component for component, _ in modules}
    missing: list[str] = []
    for key, value in flat.items():
        component, _, rest = key.partition(".")
        suffix = next((s for s in file_names if rest.endswith("." + s)), None)
        if component not in components or suffix is None:
            raise AdapterError(f"{source}: unrecognised diffusers adapter key {key}")
        module = rest[: -len(suffix) - 1]
        if (component, module) not in modules:
            missing.append(f"{component}.{module}")
            continue
        named = tensors.setdefault((component, module), {})
        if file_names[suffix] in named:
            raise AdapterError(f"{source}: tensor {key} appears twice")
        named[file_names[suffix]] = value
    return _check_unmatched(tensors, sorted(set(missing)), source, unmatched)


def _put(flat: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    if key in flat:
        raise AdapterError(f"two adapter tensors map to the same file key {key}")
    flat[key] = value
