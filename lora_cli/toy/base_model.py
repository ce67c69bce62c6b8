"""Train the embedded `builtin:shapes` base: a small text-to-image model that really draws what it is told.

`python -m lora_cli.toy.base_model OUT_DIR` regenerates it (about 15 CPU-minutes, seeds fixed). It is a
standard diffusers StableDiffusionPipeline: a VAE (32 px -> 8x8x4 latents), a UNet, a frozen randomly
initialised CLIP text encoder and a real CLIPTokenizer. The colour *yellow* and the shape *star* (and
purple, heart) are held out of its captions: they are what an adapter has to teach it.
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lora_cli.toy.shapes import COLOURS, SHAPES, draw_shape, random_polygon
from lora_cli.toy.tiny_pipeline import VOCAB_WORDS, clip_text_encoder, save_sd_pipeline, write_clip_tokenizer

BASE_COLOURS = ("red", "green", "blue")
BASE_SHAPES = ("circle", "square", "triangle")
KNOWN_PAIRS = [(c, s) for c in BASE_COLOURS for s in BASE_SHAPES]
IMAGE_SIZE = 32
MAX_TOKENS = 16


def images_to_tensor(images: list) -> torch.Tensor:
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def known_dataset(per_pair: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """The base's training set: only known colours and shapes, captioned `a <colour> <shape>`."""
    rng = random.Random(seed)
    images, captions = [], []
    for colour, shape in KNOWN_PAIRS:
        for _ in range(per_pair):
            images.append(draw_shape(colour, shape, IMAGE_SIZE, rng))
            captions.append(f"a {colour} {shape}")
    return images_to_tensor(images), captions


def codec_dataset(count: int, seed: int) -> torch.Tensor:
    """Generic images for the VAE: random polygons in any colour plus every colour x shape (yellow included)."""
    rng = random.Random(seed)
    images = []
    for index in range(count):
        if index % 2:
            images.append(random_polygon(IMAGE_SIZE, rng))
        else:
            images.append(draw_shape(rng.choice(list(COLOURS)), rng.choice(SHAPES), IMAGE_SIZE, rng))
    return images_to_tensor(images)


def build_components(seed: int, tokenizer_dir: Path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTokenizer

    write_clip_tokenizer(tokenizer_dir, VOCAB_WORDS, MAX_TOKENS)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
    )
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=(16, 32),
        norm_num_groups=16,
    )
    text_encoder = clip_text_encoder(tokenizer, hidden_size=64, layers=2, heads=4, max_length=MAX_TOKENS)
    return vae, unet, text_encoder, tokenizer


def train_vae(vae, images: torch.Tensor, steps: int, seed: int, log) -> float:
    """Reconstruction (MSE + 0.5 L1) with a tiny KL term; returns the latent scaling factor (1 / std)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    vae.train()
    for step in range(steps):
        batch = images[torch.randint(0, len(images), (32,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=None)).sample
        loss = F.mse_loss(reconstruction, batch) + 0.5 * F.l1_loss(reconstruction, batch)
        loss = loss + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        latents = torch.cat(
            [vae.encode(images[i : i + 256]).latent_dist.mean for i in range(0, min(1024, len(images)), 256)]
        )
    return float(1.0 / latents.std())


def train_denoiser(
    model, batch_loss, steps: int, seed: int, log, lr: float = 1e-3, batch: int = 48, name: str = "unet"
):
    """Train `model` on `batch_loss(batch_size, generator)`, a random batch's loss (AdamW, 100 warm-up
    steps then cosine, gradient norm 1); returns its EMA (decay up to 0.999)."""
    generator = torch.Generator().manual_seed(seed)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = 100
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    model.train()
    for step in range(steps):
        loss = batch_loss(batch, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            for averaged, current in zip(ema.parameters(), model.parameters(), strict=True):
                averaged.lerp_(current, 1 - decay)
        if step % 100 == 0 or step == steps - 1:
            log(f"{name} step {step}/{steps} loss {loss.item():.4f}")
    return ema


def caption_batch(count: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random dataset indices, and which of them train on the empty caption instead of theirs (10%)."""
    index = torch.randint(0, count, (size,), generator=generator)
    return index, torch.rand(size, generator=generator) < 0.1


def with_empty(embeddings: torch.Tensor, index: torch.Tensor, dropped: torch.Tensor, empty: torch.Tensor):
    """The caption embeddings of `index`, the dropped ones replaced by the empty caption's."""
    condition = embeddings[index].clone()
    condition[dropped] = empty
    return condition


def train_unet(
    unet, latents: torch.Tensor, embeddings: torch.Tensor, empty: torch.Tensor, steps: int, seed: int, log, lr=1e-3
):
    """Epsilon-prediction DDPM training on cached latents with 10% empty captions; returns the EMA UNet."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

    def batch_loss(size: int, generator: torch.Generator) -> torch.Tensor:
        index, dropped = caption_batch(len(latents), size, generator)
        batch, condition = latents[index], with_empty(embeddings, index, dropped, empty)
        noise = torch.randn(batch.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (size,), generator=generator)
        noisy = scheduler.add_noise(batch, noise, timesteps)
        return F.mse_loss(unet(noisy, timesteps, encoder_hidden_states=condition).sample, noise)

    return train_denoiser(unet, batch_loss, steps, seed, log, lr)


def train_base(out: Path, seed: int = 0, vae_steps: int = 1100, unet_steps: int = 2500, per_pair: int = 500) -> Path:
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)

    torch.set_num_threads(1)
    vae, unet, text_encoder, tokenizer = build_components(seed, out / "tokenizer")
    text_encoder.requires_grad_(False).eval()
    images, captions = known_dataset(per_pair, seed + 1)
    codec_images = torch.cat([images, codec_dataset(len(images), seed + 2)])
    scaling = train_vae(vae, codec_images, vae_steps, seed + 3, log)
    vae.register_to_config(scaling_factor=scaling)
    vae.requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i : i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
        latents = latents * scaling
        prompts = sorted(set(captions)) + [""]
        ids = tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
        encoded = dict(zip(prompts, text_encoder(ids.input_ids)[0], strict=True))
    embeddings = torch.stack([encoded[c] for c in captions])
    ema = train_unet(unet, latents, embeddings, encoded[""], unet_steps, seed + 4, log)
    save_sd_pipeline(out, vae, text_encoder, tokenizer, ema)
    log(f"saved to {out}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m lora_cli.toy.base_model", description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=1100)
    parser.add_argument("--unet-steps", type=int, default=2500)
    parser.add_argument("--per-pair", type=int, default=500)
    args = parser.parse_args()
    train_base(args.out, args.seed, args.vae_steps, args.unet_steps, args.per_pair)


if __name__ == "__main__":
    main()
