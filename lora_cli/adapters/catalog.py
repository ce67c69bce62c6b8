"""The modules a base offers an adapter, named as the loaded models name them, with their weight shapes.

Built from loaded components (training, sampling) or from weight headers (merge, info, extract, resize,
convert --base); both name a module the same way, so every command matches an adapter file alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from lora_cli.adapters.keys import ModuleKey
from lora_cli.adapters.targets import adaptable_module_names

if TYPE_CHECKING:
    from torch import nn

    from lora_cli.models.base import Architecture
    from lora_cli.models.weights import BaseWeights


@dataclass(frozen=True)
class ModuleCatalog:
    architecture: Architecture
    shapes: dict[ModuleKey, tuple[int, ...]]

    @classmethod
    def from_components(cls, architecture: Architecture, components: dict[str, nn.Module]) -> ModuleCatalog:
        """Linear and Conv2d layers of loaded components (peft-wrapped ones under their own name)."""
        shapes = {}
        for component, model in components.items():
            for name in adaptable_module_names(model):
                layer = model.get_submodule(name)
                weight = getattr(layer, "base_layer", layer).weight
                shapes[(component, name)] = _logical_shape(layer, tuple(weight.shape))
        return cls(architecture, shapes)

    @classmethod
    def from_weights(cls, weights: BaseWeights) -> ModuleCatalog:
        """Modules with 2-D or 4-D weights in the adaptable components' headers."""
        return cls(weights.source.architecture, weights.adaptable_shapes())

    def modules(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for component, module in self.shapes:
            found.setdefault(component, []).append(module)
        return found

    @cached_property
    def aliases(self) -> dict[str, dict[str, str]]:
        """Other spellings of module paths, per component: `{alias: module}` (e.g. a UNet's original names)."""
        return {
            component: self.architecture.module_aliases(component, modules)
            for component, modules in self.modules().items()
        }

    def resolve(self, component: str, path: str) -> str | None:
        """The module a path names in `component`, directly or through an alias (None if nothing)."""
        if (component, path) in self.shapes:
            return path
        return self.aliases.get(component, {}).get(path)


def _logical_shape(layer: nn.Module, stored: tuple[int, ...]) -> tuple[int, ...]:
    """A quantized layer stores packed weights; its logical shape is (out_features, in_features)."""
    if hasattr(layer, "out_features") and hasattr(layer, "in_features") and len(stored) != 4:
        return (layer.out_features, layer.in_features)
    return stored
