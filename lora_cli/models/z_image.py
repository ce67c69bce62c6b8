"""Z-Image (Z-Image, Z-Image-Turbo): a flow-matching single-stream DiT over 2x2 latent patches of Flux's
16-channel VAE, reading Qwen3's second-to-last hidden states of the chat-templated caption."""

from __future__ import annotations

import re

import torch

from lora_cli.models.base import LoadedBase
from lora_cli.models.naming import KohyaComponent
from lora_cli.models.tokens import padded_tokens
from lora_cli.models.transformer_base import DiffusionTransformer

BLOCK_GROUPS = ("noise_refiner", "context_refiner", "layers")  # in the order the forward pass runs them
ATTENTION = tuple(f"layers.*.attention.{name}" for name in ("to_q", "to_k", "to_v", "to_out.0"))
FEED_FORWARD = tuple(f"layers.*.feed_forward.{name}" for name in ("w1", "w2", "w3"))  # SwiGLU
# Z-Image's original module names (fused `attention.qkv`, `attention.out`) as ComfyUI writes them.
ORIGINAL_NAMES = r"^diffusion_model\.(layers|noise_refiner|context_refiner)\.\d+\.attention\.(qkv|out)\."
KOHYA_FACTORS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
TENSORS = (*KOHYA_FACTORS, *KOHYA_FACTORS.values(), "alpha")


class ZImage(DiffusionTransformer):
    name = "z-image"
    pipeline_class = "ZImagePipeline"
    text_encoder_classes = {"text_encoder": "tokenizer"}  # Qwen3 (4B in the release)
    default_text_tokens = 512  # the pipeline's max_sequence_length, chat template included
    # The joint layers, as ai-toolkit and musubi-tuner train them (the two refiner pairs stay frozen).
    target_presets = {"attention": ATTENTION, "attention_ff": (*ATTENTION, *FEED_FORWARD), "full": ("*",)}
    default_text_encoder_targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    trained_text_encoders = ()  # the community's trainers all keep the 4B Qwen3 frozen
    # musubi-tuner's stems spell diffusers' module names. The text-encoder entry is never written, but with one
    # component a base-less guess would take SD's UNet-only `lora_unet_` files for Z-Image ones.
    kohya_table = {"transformer": KohyaComponent("lora_unet_"), "text_encoder": KohyaComponent("lora_te_")}
    foreign_layouts = {
        "musubi-tuner (fused qkv)": r"^lora_unet_(layers|noise_refiner|context_refiner)_\d+_attention_qkv\.",
        "comfyui (Z-Image original names)": ORIGINAL_NAMES,
    }

    def prepare_for_diffusers_conversion(self, flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """diffusers' converter splits a fused qkv only in kohya stems, so ComfyUI's `diffusion_model.` files in
        the original names are respelled as stems (`lora_unet_layers_0_attention_qkv.lora_down.weight`)."""
        if not any(re.match(ORIGINAL_NAMES, key) for key in flat):
            return flat
        respelled = {}
        for key, value in flat.items():
            body = key.removeprefix("diffusion_model.")
            tensor = next((name for name in TENSORS if body.endswith("." + name)), None)
            if key.startswith("diffusion_model.") and tensor:
                module = body[: -len(tensor) - 1].replace(".", "_")
                key = f"lora_unet_{module}.{KOHYA_FACTORS.get(tensor, tensor)}"
            respelled[key] = value
        return respelled

    def blocks(self, denoiser: torch.nn.Module) -> list[str]:
        """Noise refiners (image tokens), context refiners (text tokens), then the joint layers over both."""
        return [f"{group}.{i}" for group in BLOCK_GROUPS for i in range(len(getattr(denoiser, group)))]

    def encode_prompts(self, base: LoadedBase, captions: list[str]) -> dict[str, torch.Tensor]:
        """Qwen3's hidden_states[-2] of each caption in the chat template (one user turn, the assistant's turn
        opened, thinking on), padded and cut to the token limit, with the mask of the real tokens (the padding
        is zeroed; `predict` drops it as the pipeline does)."""
        tokenizer, encoder = base.tokenizers["text_encoder"], base.text_encoders["text_encoder"]
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": caption}], tokenize=False, add_generation_prompt=True, enable_thinking=True
            )
            for caption in captions
        ]
        batch = padded_tokens(tokenizer, texts, base.pipeline_extras["text_tokens"], encoder.device)
        mask = batch.attention_mask.bool()
        states = encoder(input_ids=batch.input_ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        return {"encoder_hidden_states": states * mask[..., None].to(states.dtype), "encoder_attention_mask": mask}

    def predict(
        self, denoiser: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: dict
    ) -> torch.Tensor:
        """The transformer takes per-sample lists (latents as one frame [C, 1, h, w], the caption's real token
        states), time running the other way (1 - sigma), and predicts x0 - noise: the velocity negated."""
        states = conditioning["encoder_hidden_states"].to(noisy_latents.dtype)
        mask = conditioning["encoder_attention_mask"].bool()  # cached masks come back as floats
        captions = [row[keep] for row, keep in zip(states, mask, strict=True)]
        frames = list(noisy_latents.unsqueeze(2).unbind(0))
        time = (1000 - timesteps.float() * 1000) / 1000  # the pipeline's (1000 - t) / 1000, in float32
        output = denoiser(frames, time, captions, return_dict=False)[0]
        return -torch.stack(output).squeeze(2)
