"""Swap adapters on one loaded base by patching weights: W = W0 + scale * delta, in float32.

The base is loaded once; applying another set of adapters restores the touched weights from exact copies and
adds the new deltas. This works for every algorithm (the deltas come from `adapters.functional`), stacks any
number of adapters, and costs a small fraction of loading a pipeline.
"""

from __future__ import annotations

import torch
from torch import nn

from lora_cli.adapters.files import AdapterFile
from lora_cli.adapters.functional import merged_weight
from lora_cli.adapters.keys import ModuleKey
from lora_cli.errors import AdapterError


class WeightPatcher:
    """Applies {adapter file: scale} to the components' weights and can always go back to the base."""

    def __init__(self, components: dict[str, nn.Module]) -> None:
        self.components = components
        self.originals: dict[ModuleKey, torch.Tensor] = {}

    def add(self, file: AdapterFile) -> None:
        """Keep the file's tensors beside the weights they change (on their device)."""
        for (component, module), named in file.tensors.items():
            device = self.components[component].get_submodule(module).weight.device
            named.update({name: value.to(device) for name, value in named.items()})

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
