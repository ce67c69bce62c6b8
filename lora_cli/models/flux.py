"""Flux (FLUX.1 dev/schnell-style): a flow-matching DiT over 2x2-packed latents, CLIP pooled + T5 text."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lora_cli.errors import ModelLoadError
from lora_cli.io.keys import KohyaComponent
from lora_cli.models.base import BaseIdentity, LoadedBase
from lora_cli.models.components import encode_images, latents_from_encoding, load_components
from lora_cli.models.source import weight_fingerprint
from lora_cli.training.objectives import FlowMatchingObjective, resolution_shift

if TYPE_CHECKING:
    from lora_cli.config.schema import ModelSection, Preset
    from lora_cli.training.data import CropGeometry

T5_TOKENS = 512  # Flux dev's T5 limit (schnell was trained with 256)


class Flux:
    name = "flux"
    denoiser_name = "transformer"
    pipeline_class = "FluxPipeline"
    text_encoder_classes = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}  # CLIP, T5
    attention = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    target_presets = {
        "attention": attention,
        # + the feed-forwards of both streams and the single blocks' fused MLP/output projections
        "attention_ff": (*attention, "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
                         "proj_mlp", "single_transformer_blocks.*.proj_out"),  # fmt: skip
        "full": ("*",),
    }
    default_text_encoder_targets = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # CLIP only
    # diffusers module names; the default file layout for Flux is diffusers' (what diffusers and ComfyUI load).
    kohya_table = {
        "transformer": KohyaComponent("lora_transformer_"),
        "text_encoder": KohyaComponent("lora_te1_text_model_", drop="text_model."),
        "text_encoder_2": KohyaComponent("lora_te2_"),
    }
    default_format = "diffusers"

    def matches(self, pipeline_class: str) -> bool:
        return pipeline_class in {"FluxPipeline", "FluxImg2ImgPipeline"}

    def load(self, spec: ModelSection, location: Path | None, dtype: torch.dtype) -> LoadedBase:
        if location is not None and location.is_file():
            raise ModelLoadError(
                f"model.path: {location}: Flux single-file checkpoints are not supported; "
                "give a diffusers folder or hub id (e.g. black-forest-labs/FLUX.1-dev)"
            )
        source = str(location) if location is not None else spec.path
        names = ["transformer", "vae", "scheduler", *self.text_encoder_classes, *self.text_encoder_classes.values()]
        components = load_components(spec, source, names, dtype)
        vae = components["vae"]
        return LoadedBase(
            architecture=self,
            identity=BaseIdentity(spec.path, weight_fingerprint(spec, location), self.name),
            denoiser=components["transformer"],
            vae=vae,
            text_encoders={name: components[name] for name in self.text_encoder_classes},
            tokenizers={name: components[tokenizer] for name, tokenizer in self.text_encoder_classes.items()},
            noise_scheduler=components["scheduler"],
            pipeline_extras={
                "scheduler": components["scheduler"],
                "vae_scaling_factor": vae.config.scaling_factor,
                "vae_shift_factor": vae.config.shift_factor or 0.0,
                "text_tokens": spec.max_text_tokens or T5_TOKENS,
            },
        )

    def blocks(self, denoiser: torch.nn.Module) -> list[str]:
        double = [f"transformer_blocks.{i}" for i in range(len(denoiser.transformer_blocks))]
        single = [f"single_transformer_blocks.{i}" for i in range(len(denoiser.single_transformer_blocks))]
        return [*double, *single]

    def encode_prompts(self, base: LoadedBase, captions: list[str]) -> dict[str, torch.Tensor]:
        """CLIP's pooled output (the global vector) and T5's token states, padded to the token limit."""
        clip_tokenizer, clip = base.tokenizers["text_encoder"], base.text_encoders["text_encoder"]
        t5_tokenizer, t5 = base.tokenizers["text_encoder_2"], base.text_encoders["text_encoder_2"]
        clip_ids = clip_tokenizer(
            captions, padding="max_length", max_length=clip_tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids  # fmt: skip
        t5_ids = t5_tokenizer(
            captions, padding="max_length", max_length=base.pipeline_extras["text_tokens"], truncation=True,
            return_tensors="pt",
        ).input_ids  # fmt: skip
        pooled = clip(clip_ids.to(clip.device)).pooler_output
        return {"encoder_hidden_states": t5(t5_ids.to(t5.device))[0], "pooled_projections": pooled}

    def encode_images(self, base: LoadedBase, pixels: torch.Tensor) -> torch.Tensor:
        return encode_images(base.vae, pixels)

    def latents_from_encoding(self, base: LoadedBase, encoding: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        extras = base.pipeline_extras
        return latents_from_encoding(encoding, noise, extras["vae_scaling_factor"], extras["vae_shift_factor"])

    def objective(self, base: LoadedBase, preset: Preset, latents: torch.Tensor) -> FlowMatchingObjective:
        shift = preset.flow.shift
        if shift is None or shift == "auto":  # Flux's default: more noise for more image tokens
            shift = resolution_shift((latents.shape[2] // 2) * (latents.shape[3] // 2))
        return FlowMatchingObjective(preset.flow, float(shift))

    def extra_conditioning(
        self, base: LoadedBase, preset: Preset, geometry: list[CropGeometry], device: torch.device
    ) -> dict[str, torch.Tensor]:
        if not base.denoiser.config.guidance_embeds:
            return {}
        return {"guidance": torch.full((len(geometry),), preset.flow.guidance, device=device)}

    def predict(
        self, denoiser: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: dict
    ) -> torch.Tensor:
        """Pack 2x2 latent patches into tokens, run the transformer at noise level sigma, unpack."""
        batch, channels, height, width = noisy_latents.shape
        packed = noisy_latents.reshape(batch, channels, height // 2, 2, width // 2, 2)
        packed = packed.permute(0, 2, 4, 1, 3, 5).reshape(batch, (height // 2) * (width // 2), channels * 4)
        image_ids = torch.zeros(height // 2, width // 2, 3, device=packed.device)
        image_ids[..., 1] += torch.arange(height // 2, device=packed.device)[:, None]
        image_ids[..., 2] += torch.arange(width // 2, device=packed.device)[None, :]
        text = conditioning["encoder_hidden_states"]
        output = denoiser(
            hidden_states=packed,
            timestep=timesteps.to(packed.dtype),
            guidance=conditioning.get("guidance"),
            pooled_projections=conditioning["pooled_projections"],
            encoder_hidden_states=text,
            txt_ids=torch.zeros(text.shape[1], 3, device=packed.device, dtype=packed.dtype),
            img_ids=image_ids.reshape(-1, 3).to(packed.dtype),
            return_dict=False,
        )[0]
        output = output.reshape(batch, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return output.reshape(batch, channels, height, width)

    def native_size(self, base: LoadedBase) -> int:
        return 1024

    def build_pipeline(self, base: LoadedBase) -> Any:
        from diffusers import FluxPipeline

        if base.vae is None or not base.text_encoders:
            raise RuntimeError("the VAE and text encoders were released; previews need them kept in memory")
        return FluxPipeline(
            scheduler=base.pipeline_extras["scheduler"],
            vae=base.vae,
            transformer=base.denoiser,
            text_encoder=base.text_encoders["text_encoder"],
            tokenizer=base.tokenizers["text_encoder"],
            text_encoder_2=base.text_encoders["text_encoder_2"],
            tokenizer_2=base.tokenizers["text_encoder_2"],
        )
