"""Targets for `lora-transfer`, derived from `builtin:shapes` with the project's own training code.

- `finetuned`: the built-in UNet trained further (lr 3e-4, 600 steps of batch 48) on the known colours and
  shapes drawn differently: a darker grey background (185-215 per channel instead of 225-250) and smaller
  shapes (radius 18-28% of the side instead of 22-34%). An "upgraded" base: same lineage, other taste.
- `recoloured`: a lighter fine-tune (lr 1e-4, 300 steps) on one change of look only: a grey background
  (160-200 per channel), shapes of the usual sizes.
- `reseeded`: the same UNet architecture trained from scratch with another initialisation and data seed
  (the base's own recipe, 2,500 steps). Same VAE, text encoder and tokenizer: a base of the same
  architecture that shares no weights with the source's UNet.

Each is a diffusers folder; `derive(kind, folder)` writes it once (atomically) and reuses it afterwards.
Run: `python -m benchmarks.derived_bases OUT_DIR [--kinds finetuned,recoloured,reseeded]`
"""

from __future__ import annotations

import argparse
import random
import shutil
import time
from pathlib import Path

import torch

from lora_cli.builtin import builtin_path
from lora_cli.io.atomic import atomic_directory
from lora_cli.toy.base_model import IMAGE_SIZE, KNOWN_PAIRS, MAX_TOKENS, images_to_tensor, train_unet
from lora_cli.toy.shapes import draw_shape

KINDS = ("finetuned", "recoloured", "reseeded")
SHIFTED_LOOK = {"background": (185, 215), "radius_share": (0.18, 0.28)}
GREY_LOOK = {"background": (160, 200)}


def derive(kind: str, folder: Path) -> Path:
    """The derived base `kind` in `folder`, trained now unless it is already there."""
    if (folder / "model_index.json").exists():
        return folder
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{kind} {time.perf_counter() - started:6.1f}s] {message}", flush=True)

    source = builtin_path("shapes")
    torch.set_num_threads(1)
    vae = AutoencoderKL.from_pretrained(source / "vae").eval()
    tokenizer = CLIPTokenizer.from_pretrained(source / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(source / "text_encoder").eval()
    if kind == "finetuned":
        unet = UNet2DConditionModel.from_pretrained(source / "unet")
        look, per_pair, steps, lr, seed = SHIFTED_LOOK, 200, 600, 3e-4, 100
    elif kind == "recoloured":
        unet = UNet2DConditionModel.from_pretrained(source / "unet")
        look, per_pair, steps, lr, seed = GREY_LOOK, 200, 300, 1e-4, 300
    elif kind == "reseeded":
        torch.manual_seed(1)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(source / "unet"))
        look, per_pair, steps, lr, seed = {}, 500, 2500, 1e-3, 200
    else:
        raise ValueError(f"unknown derived base {kind!r}; choose from {', '.join(KINDS)}")
    rng = random.Random(seed)
    pairs = [pair for pair in KNOWN_PAIRS for _ in range(per_pair)]
    images = images_to_tensor([draw_shape(c, s, IMAGE_SIZE, rng, **look) for c, s in pairs])
    captions = [f"a {c} {s}" for c, s in pairs]
    with torch.no_grad():
        scaling = vae.config.scaling_factor
        latents = torch.cat([vae.encode(images[i : i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
        prompts = sorted(set(captions)) + [""]
        ids = tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
        encoded = dict(zip(prompts, text_encoder(ids.input_ids)[0], strict=True))
    embeddings = torch.stack([encoded[c] for c in captions])
    ema = train_unet(unet, latents * scaling, embeddings, encoded[""], steps, seed + 1, log, lr=lr)
    with atomic_directory(folder) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("unet"))
        ema.save_pretrained(tmp / "unet")
    log(f"saved to {folder}")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--kinds", default=",".join(KINDS))
    args = parser.parse_args()
    for kind in args.kinds.split(","):
        derive(kind, args.out / kind)


if __name__ == "__main__":
    main()
