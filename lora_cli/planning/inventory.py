"""A base model's tensors (name, shape, dtype) by component, as the planner counts them (from the headers
`lora_cli.models.weights` reads)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from lora_cli.config.schema import ModelSection
from lora_cli.errors import ModelLoadError
from lora_cli.io.safetensors_file import PICKLE_SUFFIXES

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
TORCH_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_SHARD = re.compile(r"-\d{5}-of-\d{5}$")


@dataclass(frozen=True)
class Weight:
    """One stored tensor, named as diffusers/transformers name it inside its component."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype code: F32, F16, BF16, ...

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class BaseInventory:
    """Every tensor of a base by component."""

    pipeline_class: str
    components: dict[str, tuple[Weight, ...]]

    def parameters(self, component: str) -> int:
        return sum(weight.numel for weight in self.components.get(component, ()))

    def layer_shapes(self, component: str) -> dict[str, tuple[int, ...]]:
        """Module name -> weight shape of the layers (2-D or 4-D `.weight` tensors) of a component."""
        return {
            w.name.removesuffix(".weight"): w.shape
            for w in self.components.get(component, ())
            if w.name.endswith(".weight") and len(w.shape) in (2, 4)
        }


def read_inventory(spec: ModelSection) -> BaseInventory:
    """The inventory of `model.path`, resolved as every command resolves a base (folder, single file,
    `builtin:NAME`, hub id); only headers are read, never tensor data."""
    from lora_cli.models.source import open_base_source
    from lora_cli.models.weights import read_weights

    if Path(spec.path).suffix.lower() in PICKLE_SUFFIXES:
        raise ModelLoadError(
            f"model.path: {spec.path} is a pickle checkpoint; the memory plan reads safetensors headers only, "
            "so convert it to .safetensors first"
        )
    with open_base_source(spec.path, "model.path", spec.revision, spec.variant) as source:
        weights = read_weights(source)
    components = {
        component: tuple(Weight(name, stored.shape, stored.dtype) for name, stored in named.items())
        for component, named in weights.tensors.items()
    }
    return BaseInventory(source.pipeline_class, components)
