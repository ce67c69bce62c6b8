"""Swap adapters on one loaded base by patching weights: W = W0 + scale * delta, in float32.

The base is loaded once; applying another set of adapters restores the touched weights from exact copies and
adds the new deltas. This works for every algorithm (the deltas come from `adapters.functional`), stacks any
number of adapters, and costs a small fraction of loading a pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lora_cli.adapters.functional import merged_weight
from lora_cli.adapters.targets import adaptable_module_names
from lora_cli.errors import AdapterError
from lora_cli.io.adapter_file import read_adapter
from lora_cli.io.keys import AdapterTensors, KohyaTable, ModuleKey, kohya_module_index


@dataclass(frozen=True)
class AdapterFile:
    path: Path
    algorithm: str
    tensors: AdapterTensors


class WeightPatcher:
    """Applies {adapter file: scale} to the components' weights and can always go back to the base."""

    def __init__(self, components: dict[str, nn.Module], table: KohyaTable) -> None:
        self.components = components
        self.index = kohya_module_index({c: adaptable_module_names(m) for c, m in components.items()}, table)
        self.originals: dict[ModuleKey, torch.Tensor] = {}

    def read(self, path: str | Path) -> AdapterFile:
        """Parse an adapter file once; keys that match nothing in this base are an error."""
        algorithm, tensors, _ = read_adapter(path, self.index)
        for (component, module), named in tensors.items():
            weight = self.components[component].get_submodule(module).weight
            named.update({name: value.to(weight.device) for name, value in named.items()})
            try:
                merged_weight(torch.zeros(weight.shape, device=weight.device), named)
            except RuntimeError:
                shapes = {name: tuple(t.shape) for name, t in named.items() if name != "alpha"}
                raise AdapterError(
                    f"{path}: layer {module} does not fit this base (weight {tuple(weight.shape)}, adapter {shapes})"
                ) from None
        return AdapterFile(Path(path), algorithm.name, tensors)

    @torch.no_grad()
    def apply(self, active: list[tuple[AdapterFile, float]]) -> None:
        """Make the weights equal to the base plus the given adapters at their scales (in order)."""
        self.restore()
        for adapter, scale in active:
            if scale == 0:
                continue
            for key, named in adapter.tensors.items():
                weight = self._weight(key)
                if key not in self.originals:
                    self.originals[key] = weight.detach().clone()
                patched = merged_weight(weight, named, strength=scale)
                if not torch.isfinite(patched).all():
                    raise AdapterError(f"{adapter.path}: applying it makes {key[1]} non-finite")
                weight.copy_(patched.to(weight.dtype))

    @torch.no_grad()
    def restore(self) -> None:
        for key, original in self.originals.items():
            self._weight(key).copy_(original)
        self.originals.clear()

    def _weight(self, key: ModuleKey) -> torch.Tensor:
        component, module = key
        return self.components[component].get_submodule(module).weight
