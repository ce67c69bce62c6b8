"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, a UNet, an 8x VAE, epsilon or v-prediction."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lora_cli.io.keys import KohyaComponent
from lora_cli.models.base import BaseIdentity, LoadedBase
from lora_cli.models.source import weight_fingerprint

if TYPE_CHECKING:
    from lora_cli.config.schema import ModelSection


class StableDiffusion:
    name = "stable-diffusion"
    denoiser_name = "unet"
    # Attention projections of every transformer block: the classic LoRA target set.
    default_targets = ("to_q", "to_k", "to_v", "to_out.0")
    # kohya's default text-encoder targets: attention and MLP projections.
    default_text_encoder_targets = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    kohya_table = {
        "unet": KohyaComponent("lora_unet_"),
        "text_encoder": KohyaComponent("lora_te_text_model_", drop="text_model."),
    }

    def matches(self, pipeline_class: str) -> bool:
        return pipeline_class in {"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"}

    def load(self, spec: ModelSection, location: Path | None, dtype: torch.dtype) -> LoadedBase:
        from diffusers import DDPMScheduler, StableDiffusionPipeline

        kwargs: dict[str, Any] = {
            "dtype": dtype,
            "safety_checker": None,
            "feature_extractor": None,
            "requires_safety_checker": False,
        }
        if location is not None and location.is_file():
            pipe = StableDiffusionPipeline.from_single_file(str(location), config=spec.config, **kwargs)
        else:
            source = str(location) if location is not None else spec.path
            pipe = StableDiffusionPipeline.from_pretrained(
                source, revision=spec.revision, variant=spec.variant, **kwargs
            )
        identity = BaseIdentity(
            source=spec.path, fingerprint=weight_fingerprint(spec, location), architecture=self.name
        )
        return LoadedBase(
            architecture=self,
            identity=identity,
            denoiser=pipe.unet,
            vae=pipe.vae,
            text_encoders={"text_encoder": pipe.text_encoder},
            tokenizers={"text_encoder": pipe.tokenizer},
            noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
            pipeline_extras={
                "scheduler": pipe.scheduler,
                "vae_scaling_factor": pipe.vae.config.scaling_factor,
            },
        )

    def encode_prompts(self, base: LoadedBase, captions: list[str]) -> dict[str, torch.Tensor]:
        tokenizer = base.tokenizers["text_encoder"]
        encoder = base.text_encoders["text_encoder"]
        ids = tokenizer(
            captions,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(encoder.device)
        return {"encoder_hidden_states": encoder(ids)[0]}

    def encode_images(self, base: LoadedBase, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE's latent distribution parameters (mean and log-variance), sampled later per step."""
        vae = base.vae
        return vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.parameters.float()

    def latents_from_encoding(self, base: LoadedBase, encoding: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        mean, logvar = encoding.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        scaling = base.pipeline_extras["vae_scaling_factor"]
        return (mean + std * noise) * scaling

    def predict(
        self,
        denoiser: torch.nn.Module,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: dict,
    ) -> torch.Tensor:
        return denoiser(noisy_latents, timesteps, encoder_hidden_states=conditioning["encoder_hidden_states"]).sample

    def build_pipeline(self, base: LoadedBase) -> Any:
        from diffusers import StableDiffusionPipeline

        if base.vae is None or not base.text_encoders:
            raise RuntimeError("the VAE and text encoder were released; previews need them kept in memory")
        return StableDiffusionPipeline(
            vae=base.vae,
            text_encoder=base.text_encoders["text_encoder"],
            tokenizer=base.tokenizers["text_encoder"],
            unet=base.denoiser,
            scheduler=base.pipeline_extras["scheduler"],
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
