"""lora-cli beside the diffusers DreamBooth LoRA example on the same model, data, adapted modules and settings.

    python -m benchmarks.peer_compare --diffusers-examples DIR [--model FOLDER] [--steps 60] [--rounds 3]
                                      [--resolution 64] [--batch 2] [--cached]

DIR is a checkout of huggingface/diffusers' `examples/` (its `dreambooth/train_dreambooth_lora.py` is run as it
is, never copied into this project). Without `--model` both train a tiny SD1.5-shaped model built here
(`lora_cli.toy.tiny_pipeline.build_tiny_sd`, random weights). Both train a rank-4 LoRA (alpha = rank; `--rank`) on the
UNet's attention projections (to_q, to_k, to_v, to_out.0), batch 2, AdamW at a constant 1e-4 with weight decay
1e-2 and gradient clipping at 1.0, fp32 (bf16 on a GPU), seed 0, on one prompt for every image (the example's
`--instance_prompt`; lora-cli reads it from caption files). Runs are interleaved (peer, lora-cli, peer, ...),
each in a fresh process timed by `benchmarks.step_timer` (the same optimizer-step clock for both); per run the
median step over the steps after the first quarter is taken, then the median over rounds.

Printed: CPU seconds per step (what a loaded 2-core CPU shows best; wall on a GPU), wall seconds per step,
time to the first step, and the ratios lora-cli / peer. On CPU, set OMP_NUM_THREADS=1 for stable numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

PROMPT = "a photo of sks shape"
TRAIN = "from lora_cli.cli.train import main; main()"


def build_inputs(folder: Path, model: Path | None, resolution: int) -> tuple[Path, Path]:
    from lora_cli.toy.shapes import write_dataset
    from lora_cli.toy.tiny_pipeline import build_tiny_sd

    model = model or build_tiny_sd(folder / "model", seed=0)
    data = folder / "data"
    write_dataset(data, [("red", "circle"), ("green", "square"), ("blue", "triangle"), ("yellow", "star")],
                  per_pair=4, size=resolution, seed=1)  # fmt: skip
    for caption in data.glob("*.txt"):
        caption.write_text(PROMPT)  # one prompt for every image, as the DreamBooth example trains
    return model, data


@dataclass(frozen=True)
class Settings:
    """What both trainers are given."""

    steps: int
    resolution: int
    batch: int
    rank: int = 4
    cached: bool = False  # lora-cli caches latents + text embeddings, the peer precomputes its text embeddings

    @property
    def precision(self) -> str:
        import torch

        return "bf16" if torch.cuda.is_available() else "no"

    @property
    def base_dtype(self) -> str:
        """lora-cli's model.dtype: the example stores the frozen base in its mixed precision, so the same."""
        return "bfloat16" if self.precision == "bf16" else "float32"


def peer_command(examples: Path, model: Path, data: Path, out: Path, settings: Settings) -> list[str]:
    """diffusers' DreamBooth LoRA example (rank `settings.rank` on the UNet's to_q/k/v/out.0) on `data`."""
    script = examples / "dreambooth" / "train_dreambooth_lora.py"
    if not script.is_file():
        raise SystemExit(f"{script} not found: --diffusers-examples takes diffusers' examples/ folder")
    images = out.parent / "instance-images"
    images.mkdir(exist_ok=True)
    for image in data.glob("*.png"):
        (images / image.name).write_bytes(image.read_bytes())
    flags = {
        "pretrained_model_name_or_path": model, "instance_data_dir": images, "instance_prompt": PROMPT,
        "resolution": settings.resolution, "train_batch_size": settings.batch, "max_train_steps": settings.steps,
        "rank": settings.rank, "learning_rate": "1e-4", "lr_scheduler": "constant", "lr_warmup_steps": 0,
        "adam_weight_decay": "1e-2", "max_grad_norm": 1.0, "mixed_precision": settings.precision, "seed": 0,
        "checkpointing_steps": 10**9, "dataloader_num_workers": 0, "output_dir": out,
    }  # fmt: skip
    command = [str(script), *(f"--{key}={value}" for key, value in flags.items())]
    return command + (["--pre_compute_text_embeddings"] if settings.cached else [])


def lora_cli_preset(model: Path, data: Path, out: Path, settings: Settings) -> dict:
    """The same job as a lora-cli preset: rank `settings.rank` on the UNet's attention projections."""
    return {
        "model": {"path": str(model), "dtype": settings.base_dtype},
        "data": {"folder": str(data), "resolution": settings.resolution, "shuffle": True},
        "adapter": {"type": "lora", "rank": settings.rank, "alpha": settings.rank, "targets": "attention"},
        "train": {"steps": settings.steps, "batch_size": settings.batch, "learning_rate": 1e-4,
                  "scheduler": "constant", "weight_decay": 1e-2, "max_grad_norm": 1.0,
                  "mixed_precision": settings.precision, "seed": 0},
        "cache": {"latents": settings.cached, "text_embeddings": settings.cached},
        "output": {"dir": str(out)},
    }  # fmt: skip


def lora_cli_command(preset: dict, path: Path, *flags: str) -> list[str]:
    """`lora-train` on `preset` (written to `path`), as step_timer runs it."""
    path.write_text(yaml.safe_dump(preset))
    return ["-c", TRAIN, str(path), "--no-progress", *flags]


def timed(command: list[str], stamps: Path) -> dict[str, float]:
    """Run `command` under the step timer; per-step figures from the steps after the first quarter."""
    run = [sys.executable, "-m", "benchmarks.step_timer", str(stamps), *command]
    result = subprocess.run(run, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    if result.returncode != 0 or not stamps.exists():
        raise SystemExit(f"failed: {' '.join(command[:3])} ...\n{result.stderr[-2000:]}")
    times = json.loads(stamps.read_text())
    skip = max(1, len(times["cpu"]) // 4)
    cpu = [b - a for a, b in zip(times["cpu"][skip:], times["cpu"][skip + 1 :], strict=False)]
    wall = [b - a for a, b in zip(times["wall"][skip:], times["wall"][skip + 1 :], strict=False)]
    return {"cpu_s": statistics.median(cpu), "wall_s": statistics.median(wall),
            "first_step_s": times["wall"][0] - times["started"], "steps": len(times["cpu"])}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--diffusers-examples", required=True)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--cached", action="store_true", help="lora-cli caches latents + text, the peer its text")
    args = parser.parse_args()
    settings = Settings(args.steps, args.resolution, args.batch, args.rank, args.cached)
    results: dict[str, list[dict[str, float]]] = {"diffusers example": [], "lora-cli": []}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        model, data = build_inputs(folder, args.model, args.resolution)
        for round_ in range(args.rounds):
            peer_out, ours_out = folder / f"diffusers-{round_}", folder / f"lora-cli-{round_}"
            commands = {
                "diffusers example": peer_command(Path(args.diffusers_examples), model, data, peer_out, settings),
                "lora-cli": lora_cli_command(
                    lora_cli_preset(model, data, ours_out, settings), folder / f"{ours_out.name}.yaml"
                ),
            }
            for name, command in commands.items():
                results[name].append(timed(command, folder / f"{name.split()[0]}-{round_}.json"))
    summary = {
        name: {key: statistics.median(run[key] for run in runs) for key in runs[0]} for name, runs in results.items()
    }
    peer, ours = summary["diffusers example"], summary["lora-cli"]
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    print(f"{args.steps} steps, batch {args.batch}, {args.resolution} px, rounds {args.rounds}, threads {threads}, "
          f"{'cached' if args.cached else 'nothing cached'}")  # fmt: skip
    for name, figures in summary.items():
        print(f"{name:18} CPU {figures['cpu_s'] * 1000:7.1f} ms/step   wall {figures['wall_s'] * 1000:7.1f} ms/step   "
              f"first step {figures['first_step_s']:6.1f} s")  # fmt: skip
    rounds = [f"{o['cpu_s'] / p['cpu_s']:.2f}" for p, o in zip(*results.values(), strict=True)]
    print(f"CPU ratio per round (lora-cli / peer): {', '.join(rounds)}")
    print(f"lora-cli / peer: CPU {ours['cpu_s'] / peer['cpu_s']:.2f}x, wall {ours['wall_s'] / peer['wall_s']:.2f}x, "
          f"first step {ours['first_step_s'] / peer['first_step_s']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
