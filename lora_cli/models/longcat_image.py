"""LongCat-Image: a Flux-like flow-matching MMDiT over 2x2-packed latents of Flux's 16-channel VAE, reading
Qwen2.5-VL's last hidden states of the caption padded inside a chat template (no pooled vector, no guidance
embedding; classifier-free guidance)."""

from __future__ import annotations

from typing import Any

import torch

from lora_cli.models.base import LoadedBase
from lora_cli.models.flux import TARGET_PRESETS
from lora_cli.models.naming import KohyaComponent
from lora_cli.models.patches import pack_patches, unpack_patches, unpack_pipeline_latents
from lora_cli.models.transformer_base import DiffusionTransformer

# LongCatImagePipeline's prompt_template_encode_prefix / _suffix, around the caption padded to the token limit
PROMPT_PREFIX = (
    "<|im_start|>system\nAs an image captioning expert, generate a descriptive text prompt based on an image "
    "content, suitable for input to a text-to-image model.<|im_end|>\n<|im_start|>user\n"
)
PROMPT_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"


class LongCatImage(DiffusionTransformer):
    name = "longcat-image"
    pipeline_class = "LongCatImagePipeline"
    text_encoder_classes = {"text_encoder": "tokenizer"}  # Qwen2.5-VL-7B
    default_text_tokens = 512  # the pipeline's tokenizer_max_length: every caption is padded to it
    default_shift = "auto"  # exp(mu) from the image-token count, with the scheduler's constants
    target_presets = TARGET_PRESETS  # Flux's blocks and module names
    default_text_encoder_targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    trained_text_encoders = ()  # LongCat's own trainer and SimpleTuner keep Qwen2.5-VL frozen
    # Written for LoHa/LoKr with diffusers' module names, as for Flux. The text-encoder entry is never written.
    kohya_table = {"transformer": KohyaComponent("lora_transformer_"), "text_encoder": KohyaComponent("lora_te_")}

    def blocks(self, denoiser: torch.nn.Module) -> list[str]:
        double = [f"transformer_blocks.{i}" for i in range(len(denoiser.transformer_blocks))]
        single = [f"single_transformer_blocks.{i}" for i in range(len(denoiser.single_transformer_blocks))]
        return [*double, *single]

    def encode_prompts(self, base: LoadedBase, captions: list[str]) -> dict[str, torch.Tensor]:
        """As LongCatImagePipeline._encode_prompt: each caption's tokens (quoted spans one character at a time,
        for text rendering) cut and padded to the token limit inside the template, encoded with that mask; the
        last hidden states with the template sliced off, padding included (the transformer gets no mask)."""
        from diffusers.pipelines.longcat_image.pipeline_longcat_image import split_quotation

        tokenizer, encoder = base.tokenizers["text_encoder"], base.text_encoders["text_encoder"]
        length = base.pipeline_extras["text_tokens"]
        rows = []
        for caption in captions:
            ids: list[int] = []
            for part, quoted in split_quotation(caption):
                for piece in list(part) if quoted else [part]:
                    ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
            rows.append(ids[:length])
        padded = tokenizer.pad(
            {"input_ids": rows}, max_length=length, padding="max_length", return_attention_mask=True,
            return_tensors="pt",
        )  # fmt: skip
        prefix = torch.tensor(tokenizer(PROMPT_PREFIX, add_special_tokens=False)["input_ids"])
        suffix = torch.tensor(tokenizer(PROMPT_SUFFIX, add_special_tokens=False)["input_ids"])
        batch = len(captions)
        ids = torch.cat([prefix.expand(batch, -1), padded.input_ids, suffix.expand(batch, -1)], dim=-1)
        ones = padded.attention_mask.new_ones
        mask = torch.cat([ones(batch, len(prefix)), padded.attention_mask, ones(batch, len(suffix))], dim=-1)
        output = encoder(
            input_ids=ids.to(encoder.device), attention_mask=mask.to(encoder.device), output_hidden_states=True
        )
        return {"encoder_hidden_states": output.hidden_states[-1][:, len(prefix) : ids.shape[1] - len(suffix)]}

    def latents_from_pipeline(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return unpack_pipeline_latents(latents, height, width)

    def predict(
        self, denoiser: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: dict
    ) -> torch.Tensor:
        """Pack 2x2 patches into tokens and run the transformer at sigma (it scales by 1000 itself). Rotary ids:
        text (0, i, i); image (1, T + row, T + column), T the text length; the output is the velocity."""
        height, width = noisy_latents.shape[2:]
        packed = pack_patches(noisy_latents)
        text = conditioning["encoder_hidden_states"]
        count, device = text.shape[1], packed.device
        positions = torch.arange(count, device=device, dtype=torch.float32)
        text_ids = torch.stack([torch.zeros_like(positions), positions, positions], dim=-1)
        image_ids = torch.zeros(height // 2, width // 2, 3, device=device)
        image_ids[..., 0] = 1
        image_ids[..., 1] = torch.arange(height // 2, device=device)[:, None] + count
        image_ids[..., 2] = torch.arange(width // 2, device=device)[None, :] + count
        output = denoiser(
            hidden_states=packed,
            encoder_hidden_states=text.to(packed.dtype),
            timestep=timesteps.to(packed.dtype),
            img_ids=image_ids.reshape(-1, 3),
            txt_ids=text_ids,
            return_dict=False,
        )[0]
        return unpack_patches(output, height // 2, width // 2)

    def build_pipeline(self, base: LoadedBase) -> Any:
        """The pipeline without its prompt-rewriting processor (lora-cli draws the caption as given), its text
        length the one training used (the image's rotary positions start after it)."""
        import diffusers

        if base.vae is None or not base.text_encoders:
            raise RuntimeError("the VAE and text encoders were released; previews need them kept in memory")
        pipeline = diffusers.LongCatImagePipeline(
            scheduler=base.pipeline_extras["scheduler"], vae=base.vae, text_encoder=base.text_encoders["text_encoder"],
            tokenizer=base.tokenizers["text_encoder"], text_processor=None, transformer=base.denoiser,
        )  # fmt: skip
        pipeline.tokenizer_max_length = base.pipeline_extras["text_tokens"]
        return pipeline
