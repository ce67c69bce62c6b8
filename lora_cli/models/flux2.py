"""FLUX.2 [klein]: a flow-matching MMDiT (double- and parallel single-stream blocks) over FLUX.2's 32-channel
latents patched 2x2 into 128 channels and batch-normalised, reading three stacked hidden-state layers of Qwen3."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from lora_cli.models.base import LoadedBase
from lora_cli.models.naming import KohyaComponent
from lora_cli.models.tokens import padded_tokens
from lora_cli.models.transformer_base import DiffusionTransformer

if TYPE_CHECKING:
    from lora_cli.config.schema import ModelSection
    from lora_cli.models.source import BaseSource

HIDDEN_LAYERS = (9, 18, 27)  # the Qwen3 hidden states Flux2KleinPipeline stacks (0 = the embeddings)
DOUBLE_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class Flux2(DiffusionTransformer):
    name = "flux2"
    pipeline_class = "Flux2KleinPipeline"
    text_encoder_classes = {"text_encoder": "tokenizer"}  # Qwen3 (4B or 8B)
    default_text_tokens = 512  # the pipeline's max_sequence_length, chat template included
    default_shift = "auto"  # FLUX.1's resolution-dependent shift over the token count, as musubi-tuner trains
    latent_patch = 1  # the latents are already 2x2-patched: one token per latent position
    target_presets = {
        # the double blocks' joint attention and the single blocks' fused q/k/v + MLP-in projection (a single
        # block's attention cannot be adapted apart from its MLP)
        "attention": (*DOUBLE_ATTENTION, "to_qkv_mlp_proj"),
        # every Linear inside the blocks (musubi-tuner's default): + both streams' SwiGLU feed-forwards and the
        # single blocks' fused output projection
        "attention_ff": (
            *DOUBLE_ATTENTION,
            "to_qkv_mlp_proj",
            "ff.linear_in",
            "ff.linear_out",
            "ff_context.linear_in",
            "ff_context.linear_out",
            "single_transformer_blocks.*.attn.to_out",
        ),  # fmt: skip
        "full": ("*",),
    }
    default_text_encoder_targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    trained_text_encoders = ()  # musubi-tuner, ai-toolkit and DiffSynth-Studio keep the Qwen3 encoder frozen
    # Written for LoHa/LoKr with diffusers' module names, as for Flux. The text-encoder entry is never written.
    kohya_table = {"transformer": KohyaComponent("lora_transformer_"), "text_encoder": KohyaComponent("lora_te_")}
    # Black Forest Labs' module names as musubi-tuner (kohya) and ai-toolkit/ComfyUI write them; diffusers'
    # FLUX.2 converter maps them (fused q/k/v split).
    foreign_layouts = {
        "musubi-tuner (FLUX.2 original names)": r"^lora_unet_(double|single)_blocks_\d+_",
        "ai-toolkit / comfyui (FLUX.2 original names)": r"^diffusion_model\.(double|single)_blocks\.\d+\.",
    }

    def load(self, spec: ModelSection, source: BaseSource, dtype: torch.dtype) -> LoadedBase:
        """As every DiT, plus the VAE's batch-norm statistics (kept when the VAE is released after caching)
        and whether the base is a step-distilled klein (its pipeline then draws without CFG)."""
        import diffusers

        base = super().load(spec, source, dtype)
        norm = base.vae.bn
        base.pipeline_extras.update(
            is_distilled=bool(diffusers.DiffusionPipeline.load_config(str(source.location)).get("is_distilled")),
            latents_mean=norm.running_mean.detach().float().clone(),
            latents_std=torch.sqrt(norm.running_var.detach().float() + base.vae.config.batch_norm_eps),
        )
        return base

    def prepare_for_diffusers_conversion(self, flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """diffusers' converter reads `diffusion_model.` files only as lora_A/lora_B without alphas (kohya's
        names send it to a branch that finds nothing; an alpha makes it raise): rename, folding alpha / rank in."""
        if not any(key.startswith("diffusion_model.") for key in flat):
            return flat
        renamed = {}
        for key, value in flat.items():
            if key.endswith(".alpha"):
                continue
            key = key.replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B.")
            alpha = flat.get(key.split(".lora_A.")[0] + ".alpha") if ".lora_A." in key else None
            renamed[key] = value * (float(alpha) / value.shape[0]) if alpha is not None else value
        return renamed

    def blocks(self, denoiser: torch.nn.Module) -> list[str]:
        double = [f"transformer_blocks.{i}" for i in range(len(denoiser.transformer_blocks))]
        single = [f"single_transformer_blocks.{i}" for i in range(len(denoiser.single_transformer_blocks))]
        return [*double, *single]

    def encode_prompts(self, base: LoadedBase, captions: list[str]) -> dict[str, torch.Tensor]:
        """Each caption in Qwen3's chat template (thinking off), padded to the token limit and run with its
        mask; hidden states 9, 18 and 27 side by side per token. No mask reaches the transformer: it attends to
        the padding as the pipeline has it do."""
        tokenizer, encoder = base.tokenizers["text_encoder"], base.text_encoders["text_encoder"]
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": caption}],
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=False,
            )
            for caption in captions
        ]
        batch = padded_tokens(tokenizer, texts, base.pipeline_extras["text_tokens"], encoder.device)
        output = encoder(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True, use_cache=False
        )
        return {"encoder_hidden_states": torch.cat([output.hidden_states[k] for k in HIDDEN_LAYERS], dim=-1)}

    def latents_from_encoding(self, base: LoadedBase, encoding: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The VAE's mean (as the pipeline, musubi-tuner and ai-toolkit encode), 2x2-patched into channels and
        normalised with the VAE's batch-norm statistics: [B, 4 x 32, H/16, W/16]."""
        mean = encoding.chunk(2, dim=1)[0]
        batch, channels, height, width = mean.shape
        patched = mean.reshape(batch, channels, height // 2, 2, width // 2, 2).permute(0, 1, 3, 5, 2, 4)
        patched = patched.reshape(batch, channels * 4, height // 2, width // 2)
        extras, view = base.pipeline_extras, (1, -1, 1, 1)
        return (patched - extras["latents_mean"].to(patched.device).view(view)) / extras["latents_std"].to(
            patched.device
        ).view(view)

    def latents_from_pipeline(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The pipeline's tokens [B, h w, 128] (row-major, normalised and patched) as [B, 128, h, w]."""
        batch, tokens, channels = latents.shape
        rows = round((tokens * height / width) ** 0.5)
        return latents.permute(0, 2, 1).reshape(batch, channels, rows, tokens // rows)

    def predict(
        self, denoiser: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: dict
    ) -> torch.Tensor:
        """One token per latent position, at sigma (the transformer scales it by 1000); image tokens at rotary
        positions (0, row, column, 0), text tokens at (0, 0, 0, index); the output is the velocity."""
        batch, channels, height, width = noisy_latents.shape
        tokens = noisy_latents.reshape(batch, channels, height * width).permute(0, 2, 1)
        text = conditioning["encoder_hidden_states"]
        one, device = torch.arange(1), tokens.device
        image_ids = torch.cartesian_prod(one, torch.arange(height), torch.arange(width), one).to(device)
        text_ids = torch.cartesian_prod(one, one, one, torch.arange(text.shape[1])).to(device)
        output = denoiser(
            hidden_states=tokens,
            encoder_hidden_states=text.to(tokens.dtype),
            timestep=timesteps.to(tokens.dtype),
            img_ids=image_ids,
            txt_ids=text_ids,
            return_dict=False,
        )[0]
        return output.permute(0, 2, 1).reshape(batch, channels, height, width)

    def build_pipeline(self, base: LoadedBase) -> Any:
        pipeline = super().build_pipeline(base)
        pipeline.register_to_config(is_distilled=base.pipeline_extras["is_distilled"])
        return pipeline
