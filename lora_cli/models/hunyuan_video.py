"""HunyuanVideo (1.0) text-to-video: a flow-matching, guidance-distilled DiT (double- then single-stream blocks
over 1x2x2 patches of causal-VAE video latents), reading LLaVA-Llama-3's hidden states of the caption in a video
template (refined by the model's token refiner) and CLIP-L's pooled output."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from lora_cli.models.base import LoadedBase
from lora_cli.models.flux import FEED_FORWARD
from lora_cli.models.hunyuan_video_layouts import diffusers_to_original, original_to_diffusers
from lora_cli.models.naming import KohyaComponent
from lora_cli.models.tokens import padded_tokens
from lora_cli.models.transformer_base import DiffusionTransformer

if TYPE_CHECKING:
    from pathlib import Path

    from lora_cli.adapters.keys import AdapterTensors
    from lora_cli.config.schema import ModelSection, Preset
    from lora_cli.diffusion.geometry import CropGeometry
    from lora_cli.models.source import BaseSource

CROP_START = 95  # the template's system prompt in Llama 3 tokens (with <|begin_of_text|>), cropped after encoding
CLIP_TOKENS = 77
GUIDANCE_SCALE = 1000.0  # the transformer's guidance input is guidance x 1000 (as its timestep is sigma x 1000)
ATTENTION = (  # globs: the token refiner's attention (context_embedder.token_refiner...) stays out, as musubi's
    "*transformer_blocks.*.attn.to_q", "*transformer_blocks.*.attn.to_k", "*transformer_blocks.*.attn.to_v",
    "transformer_blocks.*.attn.to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
)  # fmt: skip


class HunyuanVideo(DiffusionTransformer):
    name = "hunyuan-video"
    pipeline_class = "HunyuanVideoPipeline"
    text_encoder_classes = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}  # LLaVA-Llama-3, CLIP-L
    default_text_tokens = 256  # the pipeline's max_sequence_length (after the 95 cropped template tokens)
    native_resolution = 544  # the 540p bucket
    target_presets = {
        "attention": ATTENTION,
        # + Flux's feed-forward set, the double blocks' `ff` named by path (the token refiner has an `ff` too):
        # every Linear of the double and single blocks but the modulation (musubi-tuner's default)
        "attention_ff": (
            *ATTENTION,
            *(f"transformer_blocks.*.{n}" if n.startswith("ff.") else n for n in FEED_FORWARD),
        ),
        "full": ("*",),
    }
    default_text_encoder_targets = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    trained_text_encoders = ()  # musubi-tuner and diffusion-pipe keep both encoders frozen (embeddings cached)
    kohya_table = {
        "transformer": KohyaComponent("lora_transformer_"),
        "text_encoder": KohyaComponent("lora_te1_"),
        "text_encoder_2": KohyaComponent("lora_te2_text_model_", drop="text_model."),
    }
    # Tencent's module names (fused `img_attn_qkv`, the single blocks' `linear1`) as musubi-tuner, diffusion-pipe
    # and ComfyUI write them; converted with diffusers' HunyuanVideo converter after the fixes in
    # `hunyuan_video_layouts`.
    foreign_layouts = {
        "musubi-tuner (HunyuanVideo original names)": r"^lora_unet_((double|single)_blocks_\d+|txt_in|final_layer)_",
        "diffusion-pipe (HunyuanVideo original names)": r"^transformer\.(double_blocks|single_blocks|txt_in)\.",
        "comfyui (HunyuanVideo original names)": r"^diffusion_model\.(double_blocks|single_blocks|txt_in)\.",
    }

    def load(self, spec: ModelSection, source: BaseSource, dtype: torch.dtype) -> LoadedBase:
        """As every DiT, with the Llama 3 tokenizer read as serialised: the hub folder names LlamaTokenizerFast,
        which transformers 5 rebuilds as a Llama-2 tokenizer that splits Llama 3's byte-level vocabulary wrongly
        (the 95 cropped tokens would no longer be the system prompt)."""
        base = super().load(spec, source, dtype)
        base.tokenizers["text_encoder"] = _byte_level_tokenizer(base.tokenizers["text_encoder"], source.location)
        return base

    def prepare_for_diffusers_conversion(self, flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return original_to_diffusers(flat)

    def original_layout(self, tensors: AdapterTensors) -> dict[str, torch.Tensor]:
        """Tencent's fused module names under `diffusion_model.`, the only HunyuanVideo names ComfyUI maps."""
        return diffusers_to_original(tensors)

    def blocks(self, denoiser: torch.nn.Module) -> list[str]:
        double = [f"transformer_blocks.{i}" for i in range(len(denoiser.transformer_blocks))]
        single = [f"single_transformer_blocks.{i}" for i in range(len(denoiser.single_transformer_blocks))]
        return [*double, *single]

    def encode_prompts(self, base: LoadedBase, captions: list[str]) -> dict[str, torch.Tensor]:
        """As HunyuanVideoPipeline.encode_prompt: each caption in the video template, padded to 95 + the token
        limit, Llama's hidden_states[-3] and its mask with the 95 template tokens cropped; CLIP-L's pooled output
        over 77 tokens."""
        from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

        tokenizer, llama = base.tokenizers["text_encoder"], base.text_encoders["text_encoder"]
        clip_tokenizer, clip = base.tokenizers["text_encoder_2"], base.text_encoders["text_encoder_2"]
        texts = [DEFAULT_PROMPT_TEMPLATE["template"].format(caption) for caption in captions]
        batch = padded_tokens(tokenizer, texts, base.pipeline_extras["text_tokens"] + CROP_START, llama.device)
        output = llama(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
        clip_ids = padded_tokens(clip_tokenizer, captions, CLIP_TOKENS, clip.device).input_ids
        return {
            "encoder_hidden_states": output.hidden_states[-3][:, CROP_START:],
            "encoder_attention_mask": batch.attention_mask[:, CROP_START:],
            "pooled_projections": clip(clip_ids).pooler_output,
        }

    def extra_conditioning(
        self, base: LoadedBase, preset: Preset, geometry: list[CropGeometry], device: torch.device
    ) -> dict[str, torch.Tensor]:
        """The embedded guidance (`flow.guidance`, 1.0 as musubi-tuner and diffusion-pipe train; the pipeline
        samples at 6)."""
        return {"guidance": torch.full((len(geometry),), preset.flow.guidance, device=device)}

    def predict(
        self, denoiser: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: dict
    ) -> torch.Tensor:
        """The velocity for [B, C, F, h, w] latents at sigma (the transformer takes sigma x 1000 and guidance x
        1000, patchifies and builds its rotary positions itself). Text is cut to the batch's longest caption:
        the mask keeps padding out of every attention, so the prediction is the same for less work."""
        dtype = noisy_latents.dtype
        text, mask = conditioning["encoder_hidden_states"], conditioning["encoder_attention_mask"]
        used = max(int(mask.sum(dim=1).max()), 1)
        guidance = conditioning.get("guidance", torch.ones(len(noisy_latents), device=noisy_latents.device))
        return denoiser(
            hidden_states=noisy_latents,
            timestep=(timesteps * 1000).to(dtype),
            encoder_hidden_states=text[:, :used].to(dtype),
            encoder_attention_mask=mask[:, :used].to(dtype),
            pooled_projections=conditioning["pooled_projections"].to(dtype),
            guidance=(guidance * GUIDANCE_SCALE).to(dtype),
            return_dict=False,
        )[0]


def _byte_level_tokenizer(tokenizer: Any, location: Path) -> Any:
    """`tokenizer`, or its folder read as serialised when it was loaded as a LlamaTokenizer over a byte-level
    (Llama 3) tokenizer.json."""
    serialised = location / "tokenizer" / "tokenizer.json"
    if type(tokenizer).__name__ not in {"LlamaTokenizer", "LlamaTokenizerFast"} or not serialised.is_file():
        return tokenizer
    if '"ByteLevel"' not in serialised.read_text(encoding="utf-8"):
        return tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(location / "tokenizer", padding_side="right")
