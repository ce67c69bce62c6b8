"""What every base architecture provides, and the loaded components the trainer works with."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lora_cli.config.schema import ModelSection, Preset
    from lora_cli.io.keys import KohyaTable
    from lora_cli.training.data import CropGeometry
    from lora_cli.training.objectives import Objective


@dataclass(frozen=True)
class BaseIdentity:
    """Where the base came from and a fingerprint of its weight files' headers."""

    source: str
    fingerprint: str
    architecture: str


@dataclass
class LoadedBase:
    """The components of a loaded pipeline. Encoders may be released (set to None) after caching."""

    architecture: Architecture
    identity: BaseIdentity
    denoiser: nn.Module
    vae: nn.Module | None
    text_encoders: dict[str, nn.Module]
    tokenizers: dict[str, Any]
    noise_scheduler: Any
    pipeline_extras: dict[str, Any] = field(default_factory=dict)

    def trainable_components(self) -> dict[str, nn.Module]:
        """Components an adapter may be injected into, by their key-namespace name."""
        return {self.architecture.denoiser_name: self.denoiser, **self.text_encoders}


class Architecture(Protocol):
    """One base-model family (SD1.5/2, SDXL, ...): loading, conditioning, prediction, key names."""

    name: str
    denoiser_name: str
    target_presets: dict[str, tuple[str, ...]]
    default_text_encoder_targets: tuple[str, ...]
    trained_text_encoders: tuple[str, ...]  # those `adapter.text_encoder: true` adapts (Flux: CLIP, not T5)
    kohya_table: KohyaTable
    default_format: str  # the adapter key layout its community tools read: "kohya" or "diffusers"

    def matches(self, pipeline_class: str) -> bool: ...

    def load(self, spec: ModelSection, location: Path | None, dtype: torch.dtype) -> LoadedBase: ...

    def blocks(self, denoiser: nn.Module) -> list[str]: ...

    def encode_prompts(self, base: LoadedBase, captions: list[str]) -> dict[str, torch.Tensor]: ...

    def encode_images(self, base: LoadedBase, pixels: torch.Tensor) -> torch.Tensor: ...

    def latents_from_encoding(self, base: LoadedBase, encoding: torch.Tensor, noise: torch.Tensor) -> torch.Tensor: ...

    def objective(self, base: LoadedBase, preset: Preset, latents: torch.Tensor) -> Objective: ...

    def extra_conditioning(
        self, base: LoadedBase, preset: Preset, geometry: list[CropGeometry], device: torch.device
    ) -> dict[str, torch.Tensor]: ...

    def native_size(self, base: LoadedBase) -> int: ...

    def predict(
        self, denoiser: nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: dict
    ) -> torch.Tensor: ...

    def build_pipeline(self, base: LoadedBase) -> Any: ...
