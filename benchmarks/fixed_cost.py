"""The trainer's fixed cost per step: a `lora-train` optimizer step minus the model's own forward and backward.

    python -m benchmarks.fixed_cost [--cached] [--steps 150] [--code DIR]

On the tiny SD1.5-shaped model (64 px, batch 2, LoRA rank 4 on the UNet's attention, fp32, one thread) it times,
interleaved, a full optimizer step of lora-cli's loop and the same model work written out by hand with no
trainer around it: VAE encode and text encode of a fixed batch (skipped with `--cached`, as the cache skips
them), the UNet forward with the adapter, an MSE backward. The difference (median CPU time of each) is what the
trainer adds: data loading, tokenizing, noise and timestep draws, bookkeeping, clipping and the optimizer.
`--code DIR` measures another checkout of lora-cli (e.g. a `git worktree` of an older commit) with this script.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cached", action="store_true", help="latents and text embeddings cached")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--code", type=Path, help="a lora-cli checkout to measure instead of this one")
    args = parser.parse_args()
    if args.code:
        sys.path.insert(0, str(args.code.resolve()))
    import torch

    torch.set_num_threads(1)
    from lora_cli.config import validate_preset
    from lora_cli.toy.shapes import write_dataset
    from lora_cli.toy.tiny_pipeline import build_tiny_sd
    from lora_cli.training.loop import optimizer_step
    from lora_cli.training.session import build_session, prepare_model, run_paths, scan_dataset

    folder = Path(tempfile.mkdtemp(prefix="fixed-cost-"))
    model = build_tiny_sd(folder / "model", seed=0)
    write_dataset(folder / "data", [("red", "circle"), ("yellow", "star")], per_pair=8, size=64, seed=1)
    preset = validate_preset(
        {
            "model": {"path": str(model)},
            "data": {"folder": str(folder / "data"), "resolution": 64},
            "adapter": {"rank": 4, "targets": "attention"},
            "cache": {"latents": args.cached, "text_embeddings": args.cached},
            "train": {"steps": 10 * args.steps, "learning_rate": 1e-4, "batch_size": 2},
            "output": {"dir": str(folder / "run")},
        },
        "benchmark",
    )
    session = build_session(preset, run_paths(preset), *prepare_model(preset, scan_dataset(preset)))
    model_alone = model_step(session, model, args.cached)
    for _ in range(10):  # warm-up
        optimizer_step(session)
        model_alone()
    trainer, alone = [], []
    for _ in range(args.steps):
        began = time.process_time()
        optimizer_step(session)
        trainer.append(time.process_time() - began)
        began = time.process_time()
        model_alone()
        alone.append(time.process_time() - began)
    step, work = statistics.median(trainer) * 1000, statistics.median(alone) * 1000
    what = "cached" if args.cached else "nothing cached"
    print(f"{what}: lora-cli step {step:.1f} ms, the model's forward and backward alone {work:.1f} ms, "
          f"fixed cost {step - work:.1f} ms (CPU time, medians of {args.steps})")  # fmt: skip


def model_step(session, model: Path, cached: bool):
    """The model's work for one batch of 2, by hand: what any trainer of this adapter must compute."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(model / "vae")
    text_encoder = CLIPTextModel.from_pretrained(model / "text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(model / "tokenizer")
    unet, optimizer = session.base.denoiser, session.optimizer
    pixels = torch.randn(2, 3, 64, 64)
    ids = tokenizer(["a red circle"] * 2, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        fixed_latents, fixed_states = vae.encode(pixels).latent_dist.sample() * 0.18215, text_encoder(ids)[0]
    timesteps = torch.randint(0, 1000, (2,))

    def run() -> None:
        latents, states = fixed_latents, fixed_states
        if not cached:
            with torch.no_grad():
                latents = vae.encode(pixels).latent_dist.sample() * 0.18215
                states = text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        prediction = unet(latents + noise, timesteps, states).sample
        torch.nn.functional.mse_loss(prediction, noise).backward()
        optimizer.zero_grad(set_to_none=True)

    return run


if __name__ == "__main__":
    main()
