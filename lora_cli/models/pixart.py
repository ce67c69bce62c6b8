"""PixArt-Sigma / PixArt-Alpha: a DDPM-trained DiT with T5 text (attention-masked) and learned variance.

diffusers has no LoRA loader for PixArt; lora-cli's own loader and saver cover it (`lora-sample`,
`lora-merge`, and the diffusers-layout files they read).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from lora_cli.diffusion.objectives import DenoisingObjective
from lora_cli.models.base import LoadedBase
from lora_cli.models.naming import KohyaComponent
from lora_cli.models.tokens import padded_tokens
from lora_cli.models.transformer_base import DiffusionTransformer

if TYPE_CHECKING:
    from lora_cli.config.schema import Preset
    from lora_cli.diffusion.geometry import CropGeometry


class PixArt(DiffusionTransformer):
    name = "pixart"
    pipeline_class = "PixArtSigmaPipeline"
    flow_matching = False  # a DDPM-trained transformer
    default_text_tokens = 300  # PixArt-Sigma's T5 length (Alpha used 120)
    text_encoder_classes = {"text_encoder": "tokenizer"}
    target_presets = {
        "attention": ("to_q", "to_k", "to_v", "to_out.0"),  # self- and cross-attention of every block
        "attention_ff": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"),
        "full": ("*",),
    }
    default_text_encoder_targets = ("q", "k", "v", "o")  # T5 attention
    trained_text_encoders = ("text_encoder",)
    kohya_table = {"transformer": KohyaComponent("lora_transformer_"), "text_encoder": KohyaComponent("lora_te_")}

    def matches(self, pipeline_class: str) -> bool:
        return pipeline_class in {"PixArtSigmaPipeline", "PixArtAlphaPipeline"}

    def training_scheduler(self, scheduler: Any) -> Any:
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(scheduler.config)

    def blocks(self, denoiser: torch.nn.Module) -> list[str]:
        return [f"transformer_blocks.{i}" for i in range(len(denoiser.transformer_blocks))]

    def encode_prompts(self, base: LoadedBase, captions: list[str]) -> dict[str, torch.Tensor]:
        tokenizer, encoder = base.tokenizers["text_encoder"], base.text_encoders["text_encoder"]
        batch = padded_tokens(tokenizer, captions, base.pipeline_extras["text_tokens"], encoder.device)
        states = encoder(batch.input_ids, attention_mask=batch.attention_mask)[0]
        return {"encoder_hidden_states": states, "encoder_attention_mask": batch.attention_mask.float()}

    def extra_conditioning(
        self, base: LoadedBase, preset: Preset, geometry: list[CropGeometry], device: torch.device
    ) -> dict[str, torch.Tensor]:
        """PixArt-Alpha 1024 conditions on each image's size and aspect ratio; Sigma does not."""
        if not base.denoiser.use_additional_conditions:
            return {}
        sizes = torch.tensor([[g.height, g.width] for g in geometry], dtype=torch.float32, device=device)
        return {"resolution": sizes, "aspect_ratio": sizes[:, :1] / sizes[:, 1:]}

    def objective(self, base: LoadedBase, preset: Preset, latents: torch.Tensor) -> DenoisingObjective:
        return DenoisingObjective(base.noise_scheduler, preset.train.min_snr_gamma)

    def predict(
        self, denoiser: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: dict
    ) -> torch.Tensor:
        output = denoiser(
            noisy_latents,
            encoder_hidden_states=conditioning["encoder_hidden_states"],
            encoder_attention_mask=conditioning["encoder_attention_mask"],
            timestep=timesteps,
            added_cond_kwargs={
                "resolution": conditioning.get("resolution"),
                "aspect_ratio": conditioning.get("aspect_ratio"),
            },
            return_dict=False,
        )[0]
        channels = noisy_latents.shape[1]
        return output[:, :channels] if output.shape[1] == 2 * channels else output  # drop the learned variance

    def native_size(self, base: LoadedBase) -> int:
        return int(base.denoiser.config.sample_size) * 2 ** (len(base.vae.config.block_out_channels) - 1)
