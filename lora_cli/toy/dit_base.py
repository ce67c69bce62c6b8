"""Train the embedded `builtin:shapes-dit` base: an SD3-shaped (MMDiT) flow-matching transformer for the shapes world.

`python -m lora_cli.toy.dit_base OUT_DIR` regenerates it (seeds fixed, about 11 CPU-minutes). It is a standard
diffusers StableDiffusion3Pipeline that shares `builtin:shapes`' VAE and tokenizer, with two small frozen
random-init CLIP encoders (with projections) and a T5 encoder (16 tokens each), and an SD3Transformer2DModel
(joint text-image attention blocks: the MMDiT that Flux's double-stream blocks come from) trained by rectified
flow on the same data: the known colours and shapes, with yellow, star (and purple, heart) held out. Training
goes through lora-cli's own SD3 prediction path, so the base is trained the way lora-cli trains adapters on it.

Why SD3's shape rather than Flux's: a base trained from scratch needs classifier-free guidance, and SD3's
pipeline applies it through `guidance_scale` like every other lora-cli base; Flux's pipeline only embeds a
distilled guidance value (FLUX.1 dev) or none (schnell), so a Flux-shaped base drew the known prompts at 0.86
without guidance (docs/builtin-base.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lora_cli.toy.base_model import MAX_TOKENS, caption_batch, known_dataset, train_denoiser, with_empty
from lora_cli.toy.tiny_dits import t5_encoder, t5_tokenizer
from lora_cli.toy.tiny_pipeline import VOCAB_WORDS

WIDTH = 64  # transformer width: 4 heads of 16
CLIP_WIDTH = 32  # each CLIP; side by side they fill T5's width, as SD3's pipeline lays them out
SHIFT = 1.5  # the flow shift for 16 image tokens (Flux's resolution rule gives 1.58 there); SD3 uses 3 at 1024 px


def clip_with_projection(tokenizer, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=CLIP_WIDTH, intermediate_size=2 * CLIP_WIDTH, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=MAX_TOKENS, projection_dim=CLIP_WIDTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return CLIPTextModelWithProjection(config)


def build_pipeline(seed: int, blocks: int, patch: int = 1):
    """The pipeline with `builtin:shapes`' VAE and tokenizer, fresh frozen text encoders and an untrained
    transformer."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTokenizer

    from lora_cli.builtin import builtin_path

    shapes = builtin_path("shapes")
    tokenizer = CLIPTokenizer.from_pretrained(shapes / "tokenizer")
    tokenizer_3 = t5_tokenizer(VOCAB_WORDS)
    tokenizer_3.model_max_length = MAX_TOKENS
    vae = AutoencoderKL.from_pretrained(shapes / "vae")
    vae.register_to_config(shift_factor=0.0)  # SD3's pipeline adds it unconditionally
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=patch, in_channels=4, out_channels=4, num_layers=blocks, attention_head_dim=16,
        num_attention_heads=WIDTH // 16, joint_attention_dim=2 * CLIP_WIDTH, caption_projection_dim=WIDTH,
        pooled_projection_dim=2 * CLIP_WIDTH, pos_embed_max_size=8,
    )  # fmt: skip
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT),
        vae=vae,
        text_encoder=clip_with_projection(tokenizer, seed + 10),
        tokenizer=tokenizer,
        text_encoder_2=clip_with_projection(tokenizer, seed + 11),
        tokenizer_2=tokenizer,
        text_encoder_3=t5_encoder(len(tokenizer_3), width=2 * CLIP_WIDTH, layers=2, heads=4),
        tokenizer_3=tokenizer_3,
        transformer=transformer,
    )


def train_transformer(pipe, latents, text, pooled, empty: tuple, steps: int, seed: int, log, lr: float):
    """Rectified flow on cached latents: sigmas logit-normal, shifted by the scheduler's shift as lora-cli's SD3
    objective shifts them; 10% empty captions. Returns the EMA transformer."""
    from lora_cli.models.sd3 import StableDiffusion3

    architecture, transformer = StableDiffusion3(), pipe.transformer

    def batch_loss(size: int, generator: torch.Generator) -> torch.Tensor:
        index, dropped = caption_batch(len(latents), size, generator)
        conditioning = {
            "encoder_hidden_states": with_empty(text, index, dropped, empty[0]),
            "pooled_projections": with_empty(pooled, index, dropped, empty[1]),
        }
        batch = latents[index]
        noise = torch.randn(batch.shape, generator=generator)
        sigmas = torch.sigmoid(torch.randn(size, generator=generator))
        sigmas = SHIFT * sigmas / (1 + (SHIFT - 1) * sigmas)
        view = sigmas.reshape(-1, 1, 1, 1)
        prediction = architecture.predict(transformer, (1 - view) * batch + view * noise, sigmas, conditioning)
        return F.mse_loss(prediction, noise - batch)

    return train_denoiser(transformer, batch_loss, steps, seed, log, lr, name="transformer")


def train_dit_base(
    out: Path, seed: int = 0, steps: int = 4000, per_pair: int = 500, lr: float = 1e-3, blocks: int = 4
) -> Path:
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)

    torch.set_num_threads(1)
    pipe = build_pipeline(seed, blocks)
    for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        module.requires_grad_(False).eval()
    images, captions = known_dataset(per_pair, seed + 1)
    with torch.no_grad():
        config = pipe.vae.config
        latents = torch.cat([pipe.vae.encode(images[i : i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
        latents = (latents - (config.shift_factor or 0.0)) * config.scaling_factor
        prompts = sorted(set(captions)) + [""]
        text, _, pooled, _ = pipe.encode_prompt(
            prompts, prompts, prompts, do_classifier_free_guidance=False, max_sequence_length=MAX_TOKENS
        )
    position = {prompt: index for index, prompt in enumerate(prompts)}
    rows = torch.tensor([position[caption] for caption in captions])
    empty = (text[-1], pooled[-1])
    pipe.transformer = train_transformer(pipe, latents, text[rows], pooled[rows], empty, steps, seed + 4, log, lr)
    pipe.save_pretrained(out)
    log(f"saved to {out}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m lora_cli.toy.dit_base", description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--per-pair", type=int, default=500)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--blocks", type=int, default=4)
    args = parser.parse_args()
    train_dit_base(args.out, args.seed, args.steps, args.per_pair, args.lr, args.blocks)


if __name__ == "__main__":
    main()
