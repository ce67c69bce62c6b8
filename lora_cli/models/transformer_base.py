"""What the diffusion-transformer architectures (Flux, SD3, PixArt) share: loading their components from a
diffusers folder or hub id, the VAE's latents and the pipeline built from the loaded components."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from lora_cli.diffusion.objectives import FlowMatchingObjective, resolution_shift
from lora_cli.models.base import LoadedBase
from lora_cli.models.components import encode_images, latents_from_encoding, load_components
from lora_cli.models.naming import matching_layout, no_original_layout, text_model_aliases

if TYPE_CHECKING:
    from lora_cli.adapters.keys import AdapterTensors
    from lora_cli.config.schema import ModelSection, Preset
    from lora_cli.diffusion.geometry import CropGeometry
    from lora_cli.diffusion.objectives import Objective
    from lora_cli.models.source import BaseSource


class DiffusionTransformer:
    """A DiT pipeline: `transformer`, `vae`, `scheduler` and the text encoders in `text_encoder_classes`."""

    name: str
    pipeline_class: str
    text_encoder_classes: dict[str, str]  # text encoder component -> its tokenizer component
    denoiser_name = "transformer"
    single_file = False  # the original releases' single files (e.g. BFL's Flux) are not read
    default_format = "diffusers"  # diffusers' layout: what diffusers and ComfyUI load for DiTs
    default_text_tokens: int  # T5's token limit unless model.max_text_tokens says otherwise
    caption_tokenizer = "tokenizer"  # the T5 tokenizer that bounds a caption (Flux and SD3 name theirs)
    native_resolution = 1024
    default_shift = "scheduler"  # flow.shift when unset: the scheduler's shift, or "auto" (resolution-dependent)
    flow_matching = True  # rectified flow (velocity, sigmas in (0, 1)) rather than DDPM timesteps
    cfg_parameter = "guidance_scale"  # what `--guidance` sets (the embedded guidance of Flux dev, HunyuanVideo)
    latent_patch = 4  # latent positions per transformer token (2x2 patches; 1 where the latents come patched)

    def matches(self, pipeline_class: str) -> bool:
        return pipeline_class in {self.pipeline_class, self.pipeline_class.replace("Pipeline", "Img2ImgPipeline")}

    def load(self, spec: ModelSection, source: BaseSource, dtype: torch.dtype) -> LoadedBase:
        names = ["transformer", "vae", "scheduler", *self.text_encoder_classes, *self.text_encoder_classes.values()]
        components = load_components(spec, str(source.location), names, dtype)
        vae = components["vae"]
        tokenizers = {name: components[tokenizer] for name, tokenizer in self.text_encoder_classes.items()}
        return LoadedBase(
            architecture=self,
            identity=source.identity(),
            denoiser=components["transformer"],
            vae=vae,
            text_encoders={name: components[name] for name in self.text_encoder_classes},
            tokenizers=tokenizers,
            noise_scheduler=self.training_scheduler(components["scheduler"]),
            pipeline_extras={
                "scheduler": components["scheduler"],
                "vae_scaling_factor": getattr(vae.config, "scaling_factor", 1.0),
                "vae_shift_factor": getattr(vae.config, "shift_factor", None) or 0.0,
                "text_tokens": spec.max_text_tokens or self.text_token_default(tokenizers),
                "vae_config": vae.config,  # kept when the VAE itself is released after caching latents
            },
        )

    # Layouts of the community's tools that rename or fuse modules (name -> key regex), read through diffusers.
    foreign_layouts: dict[str, str] = {}

    def module_aliases(self, component: str, modules: list[str]) -> dict[str, str]:
        return {} if component == self.denoiser_name else text_model_aliases(modules)

    def original_layout(self, tensors: AdapterTensors) -> dict[str, torch.Tensor]:
        raise no_original_layout(self.name, self.default_format)

    def converts_layout(self, keys: list[str]) -> str | None:
        return matching_layout(self.foreign_layouts, keys)

    def prepare_for_diffusers_conversion(self, flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return flat

    def text_token_default(self, tokenizers: dict[str, Any]) -> int:
        """The architecture's T5 length, or less where the base's tokenizers declare a shorter limit (a small
        base trained on short captions, such as builtin:shapes-dit)."""
        longest = max((int(tokenizer.model_max_length) for tokenizer in tokenizers.values()), default=1 << 30)
        return min(self.default_text_tokens, longest)

    def training_scheduler(self, scheduler: Any) -> Any:
        return scheduler

    def encode_images(self, base: LoadedBase, pixels: torch.Tensor) -> torch.Tensor:
        return encode_images(base.vae, pixels)

    def latents_from_encoding(self, base: LoadedBase, encoding: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        extras = base.pipeline_extras
        return latents_from_encoding(encoding, noise, extras["vae_scaling_factor"], extras["vae_shift_factor"])

    def latents_from_pipeline(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return latents

    def objective(self, base: LoadedBase, preset: Preset, latents: torch.Tensor) -> Objective:
        """Flow matching with `flow.shift`: a number, `auto` (from the image-token count: 2x2 latent patches,
        per frame for video) or, unset, the architecture's default."""
        shift = preset.flow.shift if preset.flow.shift is not None else self.default_shift
        config = base.pipeline_extras["scheduler"].config
        if shift == "scheduler":
            shift = config.get("shift") or config.get("flow_shift") or 3.0
        elif shift == "auto":
            shift = resolution_shift(math.prod(latents.shape[2:]) // self.latent_patch, config)
        return FlowMatchingObjective(preset.flow, float(shift))

    def extra_conditioning(
        self, base: LoadedBase, preset: Preset, geometry: list[CropGeometry], device: torch.device
    ) -> dict[str, torch.Tensor]:
        return {}

    def native_size(self, base: LoadedBase) -> int:
        return self.native_resolution

    def build_pipeline(self, base: LoadedBase) -> Any:
        import diffusers

        if base.vae is None or not base.text_encoders:
            raise RuntimeError("the VAE and text encoders were released; previews need them kept in memory")
        tokenizers = {tokenizer: base.tokenizers[name] for name, tokenizer in self.text_encoder_classes.items()}
        return getattr(diffusers, self.pipeline_class)(
            scheduler=base.pipeline_extras["scheduler"],
            vae=base.vae,
            transformer=base.denoiser,
            **base.text_encoders,
            **tokenizers,
        )
