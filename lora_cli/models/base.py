"""What every base architecture provides, and the loaded components the trainer works with."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lora_cli.adapters.keys import AdapterTensors
    from lora_cli.config.schema import ModelSection, Preset
    from lora_cli.diffusion.geometry import CropGeometry
    from lora_cli.diffusion.objectives import Objective
    from lora_cli.models.naming import KohyaTable
    from lora_cli.models.source import BaseSource


@dataclass(frozen=True)
class BaseIdentity:
    """Where the base came from and a fingerprint of its weight files (headers and sampled bytes)."""

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
    single_file: bool  # whether single-file checkpoints of it are read (and written by lora-merge)
    caption_tokenizer: str  # the tokenizer component whose limit bounds what of a caption the model reads
    flow_matching: bool  # trained as a rectified flow (SD3, Flux, Wan) rather than with DDPM timesteps
    cfg_parameter: str  # the pipeline call's classifier-free guidance scale (Qwen-Image: `true_cfg_scale`)

    def matches(self, pipeline_class: str) -> bool: ...

    def module_aliases(self, component: str, modules: list[str]) -> dict[str, str]:
        """Other names adapter files use for these modules (`{alias: module}`): a UNet's original block names,
        CLIP's `text_model.` level."""
        ...

    def converts_layout(self, keys: list[str]) -> str | None:
        """The name of this architecture's community layout these adapter keys are in, when it renames or fuses
        modules so that diffusers' converter for the pipeline must read it (None otherwise)."""
        ...

    def prepare_for_diffusers_conversion(self, flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Adapter tensors in a spelling diffusers' converter for this pipeline takes."""
        ...

    def original_layout(self, tensors: AdapterTensors) -> dict[str, torch.Tensor]:
        """A LoRA in the architecture's original module names, where its community tools read only those
        (HunyuanVideo in ComfyUI); an AdapterError elsewhere."""
        ...

    def load(self, spec: ModelSection, source: BaseSource, dtype: torch.dtype) -> LoadedBase: ...

    def blocks(self, denoiser: nn.Module) -> list[str]: ...

    def encode_prompts(self, base: LoadedBase, captions: list[str]) -> dict[str, torch.Tensor]: ...

    def encode_images(self, base: LoadedBase, pixels: torch.Tensor) -> torch.Tensor: ...

    def latents_from_encoding(self, base: LoadedBase, encoding: torch.Tensor, noise: torch.Tensor) -> torch.Tensor: ...

    def objective(self, base: LoadedBase, preset: Preset, latents: torch.Tensor) -> Objective: ...

    def latents_from_pipeline(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """A pipeline's final latents (as its step callback sees them) in the layout training uses."""
        ...

    def extra_conditioning(
        self, base: LoadedBase, preset: Preset, geometry: list[CropGeometry], device: torch.device
    ) -> dict[str, torch.Tensor]: ...

    def native_size(self, base: LoadedBase) -> int: ...

    def predict(
        self, denoiser: nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: dict
    ) -> torch.Tensor: ...

    def build_pipeline(self, base: LoadedBase) -> Any: ...
