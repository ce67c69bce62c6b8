"""Wan 2.x text-to-video: a flow-matching 3D DiT over causal-VAE video latents, UMT5 text."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from lora_cli.models.base import LoadedBase
from lora_cli.models.components import channel_normalised_latents
from lora_cli.models.naming import KohyaComponent
from lora_cli.models.tokens import padded_tokens
from lora_cli.models.transformer_base import DiffusionTransformer

if TYPE_CHECKING:
    pass


class Wan(DiffusionTransformer):
    name = "wan"
    pipeline_class = "WanPipeline"
    default_text_tokens = 512  # Wan's UMT5 sequence length
    native_resolution = 480
    text_encoder_classes = {"text_encoder": "tokenizer"}
    target_presets = {
        "attention": ("to_q", "to_k", "to_v", "to_out.0"),  # self- and cross-attention of every block
        "attention_ff": ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"),
        "full": ("*",),
    }
    default_text_encoder_targets = ("q", "k", "v", "o")
    trained_text_encoders = ("text_encoder",)
    kohya_table = {"transformer": KohyaComponent("lora_transformer_"), "text_encoder": KohyaComponent("lora_te_")}

    # Wan's original module names (`blocks.N.self_attn.q`) as musubi-tuner and ComfyUI write them; diffusers'
    # Wan converter maps them to its modules.
    foreign_layouts = {
        "musubi-tuner": r"^lora_unet_blocks_\d+_",
        "comfyui (Wan original names)": r"^diffusion_model\.blocks\.\d+\.",
    }

    def blocks(self, denoiser: torch.nn.Module) -> list[str]:
        return [f"blocks.{i}" for i in range(len(denoiser.blocks))]

    def encode_prompts(self, base: LoadedBase, captions: list[str]) -> dict[str, torch.Tensor]:
        """UMT5 states with the padding positions zeroed, as Wan's pipeline feeds them."""
        tokenizer, encoder = base.tokenizers["text_encoder"], base.text_encoders["text_encoder"]
        batch = padded_tokens(tokenizer, captions, base.pipeline_extras["text_tokens"], encoder.device)
        states = encoder(batch.input_ids, batch.attention_mask).last_hidden_state
        return {"encoder_hidden_states": states * batch.attention_mask[..., None].to(states.dtype)}

    def latents_from_encoding(self, base: LoadedBase, encoding: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return channel_normalised_latents(encoding, noise, base.pipeline_extras["vae_config"])

    def predict(
        self, denoiser: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: dict
    ) -> torch.Tensor:
        return denoiser(
            hidden_states=noisy_latents,
            timestep=(timesteps * 1000).to(noisy_latents.dtype),
            encoder_hidden_states=conditioning["encoder_hidden_states"],
            return_dict=False,
        )[0]

    def build_pipeline(self, base: LoadedBase) -> Any:
        pipeline = super().build_pipeline(base)
        pipeline.register_to_config(boundary_ratio=None, expand_timesteps=False)
        return pipeline
