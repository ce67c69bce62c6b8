"""Bytes a base's components take once loaded under a plan's settings, and which of them stay memory-mapped."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lora_cli.models.quantize import moved_bytes, quantizes, stored_bytes
from lora_cli.planning.adapter_size import adaptable_layers
from lora_cli.planning.inventory import DTYPE_BYTES, TORCH_DTYPE_BYTES, BaseInventory, Weight

if TYPE_CHECKING:
    from lora_cli.planning.estimate import PlanSettings

_SAFETENSORS_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


@dataclass(frozen=True)
class StoredWeights:
    """The base's weights as `settings` load them (`model.dtype`, `model.quantize` for the denoiser)."""

    inventory: BaseInventory
    settings: PlanSettings
    denoiser: str

    def component_bytes(self, component: str, device: str = "cuda", quantize: bool = True) -> int:
        """Bytes a component's weights occupy once loaded (`quantize=False`: the denoiser before quantizing); on
        the CPU a memory-mapped VAE keeps only its encoder resident (the decoder is never read while training)."""
        quantized = quantize and self.settings.quantize != "none" and component == self.denoiser
        linear = set(adaptable_layers(self.inventory.layer_shapes(component))) if quantized else set()
        encoder_only = device == "cpu" and component == "vae" and self.mapped(component)
        total = 0.0
        for weight in self.inventory.components[component]:
            if encoder_only and not weight.name.startswith(("encoder.", "quant_conv.")):
                continue
            total += self.weight_bytes(weight, linear)
        return round(total)

    def weight_bytes(self, weight: Weight, quantized_layers: set[str], moved: bool = False) -> float:
        """Bytes one stored weight takes once loaded (`moved`: of those, what block offloading moves): quantized
        if its layer is, else in `model.dtype` (floating point) or as stored."""
        mode = self.settings.quantize
        if weight.name.removesuffix(".weight") in quantized_layers and quantizes(mode, weight.shape):
            return (moved_bytes if moved else stored_bytes)(mode, weight.shape)
        if weight.dtype in ("F32", "F16", "BF16", "F64"):
            return weight.numel * TORCH_DTYPE_BYTES[self.settings.dtype]
        return weight.numel * DTYPE_BYTES.get(weight.dtype, 4)

    def mapped(self, component: str) -> bool:
        """Whether the loaded component's tensors stay memory-mapped from its files (stored in `model.dtype`, not
        quantized). Mapped pages count towards RSS only once they are read."""
        if self.settings.quantize != "none" and component == self.denoiser:
            return False
        return self.in_model_dtype(component)

    def in_model_dtype(self, component: str) -> bool:
        """Whether the component is stored in `model.dtype`, so diffusers memory-maps its files instead of
        converting them into a copy."""
        wanted = _SAFETENSORS_DTYPE[self.settings.dtype]
        weights = self.inventory.components[component]
        return all(w.dtype == wanted for w in weights if w.dtype.startswith(("F", "BF")))
