"""Stable Diffusion 3 / 3.5: a flow-matching MMDiT with CLIP-L, CLIP-G (pooled) and T5 text."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lora_cli.models.base import LoadedBase
from lora_cli.models.naming import KohyaComponent
from lora_cli.models.tokens import padded_tokens
from lora_cli.models.transformer_base import DiffusionTransformer

if TYPE_CHECKING:
    pass

CLIP_ENCODERS = ("text_encoder", "text_encoder_2")  # CLIP-L, CLIP-G (both with projection)


class StableDiffusion3(DiffusionTransformer):
    name = "stable-diffusion-3"
    pipeline_class = "StableDiffusion3Pipeline"
    caption_tokenizer = "tokenizer_3"  # T5 reads the caption (CLIP: its first 77 tokens)
    default_text_tokens = 256  # SD3's T5 sequence length in diffusers' pipeline
    text_encoder_classes = {
        "text_encoder": "tokenizer",
        "text_encoder_2": "tokenizer_2",
        "text_encoder_3": "tokenizer_3",
    }
    attention = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    target_presets = {
        "attention": attention,
        "attention_ff": (*attention, "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"),
        "full": ("*",),
    }
    default_text_encoder_targets = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # the CLIP encoders
    trained_text_encoders = ("text_encoder", "text_encoder_2")  # the two CLIPs; T5 stays frozen
    kohya_table = {
        "transformer": KohyaComponent("lora_transformer_"),
        "text_encoder": KohyaComponent("lora_te1_text_model_", drop="text_model."),
        "text_encoder_2": KohyaComponent("lora_te2_text_model_", drop="text_model."),
        "text_encoder_3": KohyaComponent("lora_te3_"),
    }

    def blocks(self, denoiser: torch.nn.Module) -> list[str]:
        return [f"transformer_blocks.{i}" for i in range(len(denoiser.transformer_blocks))]

    def encode_prompts(self, base: LoadedBase, captions: list[str]) -> dict[str, torch.Tensor]:
        """Both CLIPs' penultimate states side by side, zero-padded to T5's width and followed by T5's states;
        the pooled input is both CLIPs' projections side by side (as diffusers' SD3 pipeline builds them)."""
        hidden, pooled = [], []
        for name in CLIP_ENCODERS:
            tokenizer, encoder = base.tokenizers[name], base.text_encoders[name]
            ids = padded_tokens(tokenizer, captions, tokenizer.model_max_length, encoder.device).input_ids
            output = encoder(ids, output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
            pooled.append(output[0])
        t5_tokenizer, t5 = base.tokenizers["text_encoder_3"], base.text_encoders["text_encoder_3"]
        t5_ids = padded_tokens(t5_tokenizer, captions, base.pipeline_extras["text_tokens"], t5.device).input_ids
        t5_states = t5(t5_ids)[0]
        clip_states = torch.cat(hidden, dim=-1)
        clip_states = torch.nn.functional.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
        return {
            "encoder_hidden_states": torch.cat([clip_states, t5_states], dim=-2),
            "pooled_projections": torch.cat(pooled, dim=-1),
        }

    def predict(
        self, denoiser: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: dict
    ) -> torch.Tensor:
        return denoiser(
            hidden_states=noisy_latents,
            timestep=(timesteps * 1000).to(noisy_latents.dtype),  # SD3 takes sigma x 1000
            encoder_hidden_states=conditioning["encoder_hidden_states"],
            pooled_projections=conditioning["pooled_projections"],
            return_dict=False,
        )[0]
