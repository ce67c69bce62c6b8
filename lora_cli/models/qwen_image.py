"""Qwen-Image: a flow-matching double-stream (MMDiT) transformer over 2x2-packed latents of a causal video VAE,
reading Qwen2.5-VL's last hidden states of the caption in a chat template whose system turn is dropped."""

from __future__ import annotations

import torch

from lora_cli.models.base import LoadedBase
from lora_cli.models.components import channel_normalised_latents
from lora_cli.models.naming import KohyaComponent
from lora_cli.models.patches import pack_patches, unpack_patches, unpack_pipeline_latents
from lora_cli.models.transformer_base import DiffusionTransformer

# QwenImagePipeline's prompt_template_encode; its first 34 tokens (the system turn and `<|im_start|>user\n`,
# prompt_template_encode_start_idx) are dropped from the encoder's output.
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
TEMPLATE_PREFIX_TOKENS = 34
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class QwenImage(DiffusionTransformer):
    name = "qwen-image"
    pipeline_class = "QwenImagePipeline"
    text_encoder_classes = {"text_encoder": "tokenizer"}  # Qwen2.5-VL-7B-Instruct
    default_text_tokens = 512  # the pipeline's max_sequence_length (after the dropped system turn)
    default_shift = "auto"  # exp(mu) from the image-token count, with the scheduler's constants
    cfg_parameter = "true_cfg_scale"  # its pipeline's `guidance_scale` feeds guidance-distilled checkpoints only
    target_presets = {
        "attention": ATTENTION,  # the joint attention's image- and text-stream projections
        # + both streams' feed-forwards: musubi-tuner's default (every block Linear but the modulation)
        "attention_ff": (*ATTENTION, "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"),
        "full": ("*",),
    }
    default_text_encoder_targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    trained_text_encoders = ()  # musubi-tuner, ai-toolkit and DiffSynth-Studio all keep the 7B VLM frozen
    # musubi-tuner's stems spell diffusers' module names. The text-encoder entry is never written, but with one
    # component a base-less guess would take SD's UNet-only `lora_unet_` files for Qwen-Image ones.
    kohya_table = {"transformer": KohyaComponent("lora_unet_"), "text_encoder": KohyaComponent("lora_te_")}

    def blocks(self, denoiser: torch.nn.Module) -> list[str]:
        return [f"transformer_blocks.{i}" for i in range(len(denoiser.transformer_blocks))]

    def encode_prompts(self, base: LoadedBase, captions: list[str]) -> dict[str, torch.Tensor]:
        """The last hidden states of each caption in the template, its system turn dropped, zero-padded to the
        token limit with the mask of the real tokens (the pipeline pads to the batch's longest caption; `predict`
        trims to that again, which gives the same result)."""
        tokenizer, encoder = base.tokenizers["text_encoder"], base.text_encoders["text_encoder"]
        limit = base.pipeline_extras["text_tokens"]
        texts = [PROMPT_TEMPLATE.format(caption) for caption in captions]
        batch = tokenizer(
            texts, max_length=limit + TEMPLATE_PREFIX_TOKENS, padding=True, truncation=True, return_tensors="pt"
        ).to(encoder.device)
        states = encoder(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True
        ).hidden_states[-1]
        embeds = states.new_zeros(len(captions), limit, states.shape[-1])
        mask = torch.zeros(len(captions), limit, dtype=torch.long, device=states.device)
        for row, (hidden, valid) in enumerate(zip(states, batch.attention_mask.bool(), strict=True)):
            kept = hidden[valid][TEMPLATE_PREFIX_TOKENS:][:limit]
            embeds[row, : len(kept)] = kept
            mask[row, : len(kept)] = 1
        return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask}

    def encode_images(self, base: LoadedBase, pixels: torch.Tensor) -> torch.Tensor:
        """Images enter the causal video VAE as one frame; its distribution parameters come back as [B, 2C, h, w]."""
        vae = base.vae
        return vae.encode(pixels.to(vae.device, vae.dtype).unsqueeze(2)).latent_dist.parameters.float().squeeze(2)

    def latents_from_encoding(self, base: LoadedBase, encoding: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return channel_normalised_latents(encoding, noise, base.pipeline_extras["vae_config"])

    def latents_from_pipeline(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return unpack_pipeline_latents(latents, height, width)

    def predict(
        self, denoiser: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: dict
    ) -> torch.Tensor:
        """Pack 2x2 patches into tokens, run the transformer at sigma (no guidance input), unpack; the text is
        cut to the batch's longest caption, and its mask dropped when every token is real, as the pipeline does."""
        height, width = noisy_latents.shape[2:]
        packed = pack_patches(noisy_latents)
        text, mask = conditioning["encoder_hidden_states"], conditioning["encoder_hidden_states_mask"]
        length = int(mask.sum(dim=1).max())
        text, mask = text[:, :length], mask[:, :length]
        output = denoiser(
            hidden_states=packed,
            timestep=timesteps.to(packed.dtype),
            encoder_hidden_states=text.to(packed.dtype),
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,
            img_shapes=[[(1, height // 2, width // 2)]] * len(packed),
            return_dict=False,
        )[0]
        return unpack_patches(output, height // 2, width // 2)
