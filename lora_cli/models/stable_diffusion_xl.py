"""Stable Diffusion XL: two CLIP text encoders, pooled text embeddings and size/crop micro-conditioning."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from lora_cli.models.base import LoadedBase
from lora_cli.models.naming import KohyaComponent
from lora_cli.models.stable_diffusion import StableDiffusion
from lora_cli.models.tokens import padded_tokens

if TYPE_CHECKING:
    from lora_cli.config.schema import Preset
    from lora_cli.diffusion.geometry import CropGeometry


class StableDiffusionXL(StableDiffusion):
    name = "stable-diffusion-xl"
    pipeline_class = "StableDiffusionXLPipeline"
    text_encoder_classes = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
    trained_text_encoders = ("text_encoder", "text_encoder_2")
    # kohya's SDXL names: lora_te1_ (CLIP ViT-L) and lora_te2_ (OpenCLIP ViT-bigG).
    kohya_table = {
        "unet": KohyaComponent("lora_unet_"),
        "text_encoder": KohyaComponent("lora_te1_text_model_", drop="text_model."),
        "text_encoder_2": KohyaComponent("lora_te2_text_model_", drop="text_model."),
    }

    def encode_prompts(self, base: LoadedBase, captions: list[str]) -> dict[str, torch.Tensor]:
        """Both encoders' penultimate hidden states side by side, and the second encoder's pooled projection."""
        hidden, pooled = [], None
        for name in self.text_encoder_classes:
            tokenizer, encoder = base.tokenizers[name], base.text_encoders[name]
            ids = padded_tokens(tokenizer, captions, tokenizer.model_max_length, encoder.device).input_ids
            output = encoder(ids, output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
            pooled = output[0]  # the last encoder's projected pooled output (text_embeds)
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}

    def extra_conditioning(
        self, base: LoadedBase, preset: Preset, geometry: list[CropGeometry], device: torch.device
    ) -> dict[str, torch.Tensor]:
        """SDXL's time ids: original size, crop top-left and target size, (height, width) order."""
        rows = [[g.original_height, g.original_width, g.crop_top, g.crop_left, g.height, g.width] for g in geometry]
        return {"time_ids": torch.tensor(rows, dtype=torch.float32, device=device)}

    def predict(
        self,
        denoiser: torch.nn.Module,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: dict,
    ) -> torch.Tensor:
        added = {"text_embeds": conditioning["text_embeds"], "time_ids": conditioning["time_ids"]}
        return denoiser(
            noisy_latents,
            timesteps,
            encoder_hidden_states=conditioning["encoder_hidden_states"],
            added_cond_kwargs=added,
        ).sample

    def _pipeline_flags(self) -> dict[str, Any]:
        return {}
