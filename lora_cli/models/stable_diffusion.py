"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, a UNet, an 8x VAE, epsilon or v-prediction."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lora_cli.diffusion.objectives import DenoisingObjective
from lora_cli.models.base import LoadedBase
from lora_cli.models.components import encode_images, latents_from_encoding, load_components
from lora_cli.models.naming import KohyaComponent, no_original_layout, text_model_aliases
from lora_cli.models.single_file import original_unet_modules
from lora_cli.models.tokens import padded_tokens

if TYPE_CHECKING:
    from lora_cli.adapters.keys import AdapterTensors
    from lora_cli.config.schema import ModelSection, Preset
    from lora_cli.diffusion.geometry import CropGeometry
    from lora_cli.models.source import BaseSource


class StableDiffusion:
    name = "stable-diffusion"
    denoiser_name = "unet"
    target_presets = {
        "attention": ("to_q", "to_k", "to_v", "to_out.0"),  # the classic LoRA target set
        "attention_ff": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"),
        "full": ("*",),  # every Linear and Conv2d of the UNet
    }
    # kohya's default text-encoder targets: attention and MLP projections.
    default_text_encoder_targets = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    trained_text_encoders = ("text_encoder",)
    kohya_table = {
        "unet": KohyaComponent("lora_unet_"),
        "text_encoder": KohyaComponent("lora_te_text_model_", drop="text_model."),
    }

    pipeline_class = "StableDiffusionPipeline"
    default_format = "kohya"
    caption_tokenizer = "tokenizer"  # CLIP (SDXL: CLIP-L), whose 77 tokens bound a caption
    single_file = True  # the original (LDM) single-file checkpoints A1111 and ComfyUI load
    flow_matching = False  # DDPM timesteps and noise schedule
    cfg_parameter = "guidance_scale"
    text_encoder_classes = {"text_encoder": "tokenizer"}  # text encoder component -> its tokenizer component

    def matches(self, pipeline_class: str) -> bool:
        return pipeline_class in {self.pipeline_class, self.pipeline_class.replace("Pipeline", "Img2ImgPipeline")}

    def load(self, spec: ModelSection, source: BaseSource, dtype: torch.dtype) -> LoadedBase:
        from diffusers import DDPMScheduler

        if source.is_single_file:
            components = self._load_single_file(spec, source.location, dtype)
        else:
            components = self._load_components(spec, str(source.location), dtype)
        scheduler, vae = components["scheduler"], components["vae"]
        return LoadedBase(
            architecture=self,
            identity=source.identity(),
            denoiser=components["unet"],
            vae=vae,
            text_encoders={name: components[name] for name in self.text_encoder_classes},
            tokenizers={name: components[tokenizer] for name, tokenizer in self.text_encoder_classes.items()},
            noise_scheduler=DDPMScheduler.from_config(scheduler.config),
            pipeline_extras={"scheduler": scheduler, "vae_scaling_factor": vae.config.scaling_factor},
        )

    def _load_components(self, spec: ModelSection, source: str, dtype: torch.dtype) -> dict[str, Any]:
        names = ["unet", "vae", "scheduler", *self.text_encoder_classes, *self.text_encoder_classes.values()]
        return load_components(spec, source, names, dtype)

    def _load_single_file(self, spec: ModelSection, location: Path, dtype: torch.dtype) -> dict[str, Any]:
        import diffusers

        pipeline_class = getattr(diffusers, self.pipeline_class)
        pipe = pipeline_class.from_single_file(str(location), config=spec.config, dtype=dtype, **self._pipeline_flags())
        return pipe.components

    def _pipeline_flags(self) -> dict[str, Any]:
        return {"safety_checker": None, "requires_safety_checker": False}

    def module_aliases(self, component: str, modules: list[str]) -> dict[str, str]:
        """kohya's SDXL files and ComfyUI's `diffusion_model.` files name UNet layers by the original (LDM)
        blocks; text-encoder files spell CLIP with or without `text_model.`."""
        return original_unet_modules(modules) if component == "unet" else text_model_aliases(modules)

    def original_layout(self, tensors: AdapterTensors) -> dict[str, torch.Tensor]:
        raise no_original_layout(self.name, self.default_format)

    def converts_layout(self, keys: list[str]) -> str | None:
        return None  # every SD layout is read exactly by lora-cli's own tables

    def prepare_for_diffusers_conversion(self, flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return flat

    def blocks(self, denoiser: torch.nn.Module) -> list[str]:
        """Module-name prefixes of the UNet's blocks in execution order (for `adapter.late`)."""
        down = [f"down_blocks.{i}" for i in range(len(denoiser.down_blocks))]
        up = [f"up_blocks.{i}" for i in range(len(denoiser.up_blocks))]
        return [*down, "mid_block", *up]

    def encode_prompts(self, base: LoadedBase, captions: list[str]) -> dict[str, torch.Tensor]:
        tokenizer = base.tokenizers["text_encoder"]
        encoder = base.text_encoders["text_encoder"]
        ids = padded_tokens(tokenizer, captions, tokenizer.model_max_length, encoder.device).input_ids
        return {"encoder_hidden_states": encoder(ids)[0]}

    def encode_images(self, base: LoadedBase, pixels: torch.Tensor) -> torch.Tensor:
        return encode_images(base.vae, pixels)

    def latents_from_encoding(self, base: LoadedBase, encoding: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return latents_from_encoding(encoding, noise, base.pipeline_extras["vae_scaling_factor"], 0.0)

    def native_size(self, base: LoadedBase) -> int:
        """The image size the base was trained at (its default sampling size)."""
        factor = 2 ** (len(base.vae.config.block_out_channels) - 1)
        return int(base.denoiser.config.sample_size) * factor

    def latents_from_pipeline(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return latents

    def objective(self, base: LoadedBase, preset: Preset, latents: torch.Tensor) -> DenoisingObjective:
        return DenoisingObjective(base.noise_scheduler, preset.train.min_snr_gamma)

    def extra_conditioning(
        self, base: LoadedBase, preset: Preset, geometry: list[CropGeometry], device: torch.device
    ) -> dict[str, torch.Tensor]:
        return {}

    def predict(
        self,
        denoiser: torch.nn.Module,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: dict,
    ) -> torch.Tensor:
        return denoiser(noisy_latents, timesteps, encoder_hidden_states=conditioning["encoder_hidden_states"]).sample

    def build_pipeline(self, base: LoadedBase) -> Any:
        import diffusers

        if base.vae is None or not base.text_encoders:
            raise RuntimeError("the VAE and text encoders were released; previews need them kept in memory")
        pipeline_class = getattr(diffusers, self.pipeline_class)
        text = {name: base.text_encoders[name] for name in self.text_encoder_classes}
        tokenizers = {tokenizer: base.tokenizers[name] for name, tokenizer in self.text_encoder_classes.items()}
        flags = {**self._pipeline_flags(), "feature_extractor": None}
        return pipeline_class(
            vae=base.vae,
            unet=base.denoiser,
            scheduler=base.pipeline_extras["scheduler"],
            **text,
            **tokenizers,
            **flags,
        )
