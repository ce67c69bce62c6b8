"""Flux (FLUX.1 dev/schnell-style): a flow-matching DiT over 2x2-packed latents, CLIP pooled + T5 text."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lora_cli.models.base import LoadedBase
from lora_cli.models.naming import KohyaComponent
from lora_cli.models.patches import pack_patches, unpack_patches, unpack_pipeline_latents
from lora_cli.models.tokens import padded_tokens
from lora_cli.models.transformer_base import DiffusionTransformer

if TYPE_CHECKING:
    from lora_cli.config.schema import Preset
    from lora_cli.diffusion.geometry import CropGeometry


ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
# the feed-forwards of both streams and the single blocks' fused MLP/output projections
FEED_FORWARD = (
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
    "single_transformer_blocks.*.proj_out",
)  # fmt: skip
TARGET_PRESETS = {"attention": ATTENTION, "attention_ff": (*ATTENTION, *FEED_FORWARD), "full": ("*",)}


class Flux(DiffusionTransformer):
    name = "flux"
    pipeline_class = "FluxPipeline"
    caption_tokenizer = "tokenizer_2"  # T5 reads the caption (CLIP: its first 77 tokens)
    default_text_tokens = 512  # Flux dev's T5 limit (schnell was trained with 256)
    default_shift = "auto"  # Flux's resolution-dependent shift
    text_encoder_classes = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}  # CLIP, T5
    target_presets = TARGET_PRESETS
    default_text_encoder_targets = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # CLIP only
    trained_text_encoders = ("text_encoder",)  # CLIP; the community leaves T5 frozen
    # diffusers module names (the default file layout for DiTs is diffusers', which ComfyUI also loads).
    kohya_table = {
        "transformer": KohyaComponent("lora_transformer_"),
        "text_encoder": KohyaComponent("lora_te1_text_model_", drop="text_model."),
        "text_encoder_2": KohyaComponent("lora_te2_"),
    }

    # Black Forest Labs' original module names (fused q/k/v, `linear1` of the single blocks) as kohya's
    # sd-scripts, ComfyUI and XLabs write them; diffusers' Flux converter splits them into its modules.
    foreign_layouts = {
        "kohya (Flux original names)": r"^lora_unet_(double|single)_blocks_\d+_",
        "comfyui (Flux original names)": r"^diffusion_model\.(double|single)_blocks\.\d+\.",
        "xlabs": r"^double_blocks\.\d+\.processor\.",
    }

    def prepare_for_diffusers_conversion(self, flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """ComfyUI files may name the factors lora_A/lora_B; diffusers' converter reads kohya's names."""
        return {
            key.replace(".lora_A.weight", ".lora_down.weight").replace(".lora_B.weight", ".lora_up.weight"): value
            for key, value in flat.items()
        }

    def blocks(self, denoiser: torch.nn.Module) -> list[str]:
        double = [f"transformer_blocks.{i}" for i in range(len(denoiser.transformer_blocks))]
        single = [f"single_transformer_blocks.{i}" for i in range(len(denoiser.single_transformer_blocks))]
        return [*double, *single]

    def encode_prompts(self, base: LoadedBase, captions: list[str]) -> dict[str, torch.Tensor]:
        """CLIP's pooled output (the global vector) and T5's token states, padded to the token limit."""
        clip_tokenizer, clip = base.tokenizers["text_encoder"], base.text_encoders["text_encoder"]
        t5_tokenizer, t5 = base.tokenizers["text_encoder_2"], base.text_encoders["text_encoder_2"]
        clip_ids = padded_tokens(clip_tokenizer, captions, clip_tokenizer.model_max_length, clip.device).input_ids
        t5_ids = padded_tokens(t5_tokenizer, captions, base.pipeline_extras["text_tokens"], t5.device).input_ids
        return {"encoder_hidden_states": t5(t5_ids)[0], "pooled_projections": clip(clip_ids).pooler_output}

    def extra_conditioning(
        self, base: LoadedBase, preset: Preset, geometry: list[CropGeometry], device: torch.device
    ) -> dict[str, torch.Tensor]:
        if not base.denoiser.config.guidance_embeds:
            return {}
        return {"guidance": torch.full((len(geometry),), preset.flow.guidance, device=device)}

    def latents_from_pipeline(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return unpack_pipeline_latents(latents, height, width)

    def predict(
        self, denoiser: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: dict
    ) -> torch.Tensor:
        """Pack 2x2 latent patches into tokens, run the transformer at noise level sigma, unpack."""
        height, width = noisy_latents.shape[2:]
        packed = pack_patches(noisy_latents)
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
        return unpack_patches(output, height // 2, width // 2)
