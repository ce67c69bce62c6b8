"""Does the quickstart adapter teach the built-in base a new concept without making it forget?

Trains `presets/quickstart.yaml` with `lora-train` (in a subprocess, timed), then has the offline judge score
the base and the base + adapter (loaded by diffusers' own `load_lora_weights`) on the held-out prompt
"a yellow star" and the nine known prompts, `--samples` images each with fixed seeds. Writes JSON and a PNG
grid (rows: prompts; columns: samples before | after).

Run: `python benchmarks/concept.py [--samples 16] [--set train.steps=400 ...] [--out runs/concept]`
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
HELD_OUT = [("yellow", "star")]
KNOWN = [(c, s) for c in ("red", "green", "blue") for s in ("circle", "square", "triangle")]
TRAIN = "from lora_cli.cli.train import main; main()"


def train_adapter(out: Path, overrides: list[str]) -> tuple[Path, float]:
    command = [sys.executable, "-c", TRAIN, str(ROOT / "presets" / "quickstart.yaml"), "--no-progress", "--overwrite"]
    command += ["--set", f"output.dir={out}", *[arg for o in overrides for arg in ("--set", o)]]
    started = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return out / "yellow-star.safetensors", time.perf_counter() - started


def load_pipeline(adapter: Path | None):
    from lora_cli.config.schema import ModelSection
    from lora_cli.models import load_base

    base = load_base(ModelSection(path="builtin:shapes"))
    pipeline = base.architecture.build_pipeline(base)
    if adapter is not None:
        pipeline.load_lora_weights(str(adapter))
    return pipeline


def score(pipeline, judge, samples: int) -> dict[str, dict[str, float]]:
    from lora_cli.toy.evaluation import pair_accuracy

    held = pair_accuracy(pipeline, judge, HELD_OUT, samples, seed=10_000)
    known = pair_accuracy(pipeline, judge, KNOWN, samples, seed=20_000)
    return {"held_out": held, "known": known, "known_mean": sum(known.values()) / len(known)}


def grid(before, after, count: int) -> Image.Image:
    from lora_cli.sampling import generate_images, image_grid
    from lora_cli.toy.evaluation import GUIDANCE, SAMPLE_STEPS, prompt_for

    prompts = [prompt_for(c, s) for c, s in HELD_OUT + KNOWN[::4]]
    rows = []
    for prompt in prompts:
        seeds = list(range(count))
        row = generate_images(before, [prompt] * count, seeds, SAMPLE_STEPS, GUIDANCE, "", 32)
        row += generate_images(after, [prompt] * count, seeds, SAMPLE_STEPS, GUIDANCE, "", 32)
        rows.append(row)
    return image_grid(rows, prompts, [f"before {i}" for i in range(count)] + [f"after {i}" for i in range(count)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=16, help="images judged per prompt (>= 16 is stable)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="preset override")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "concept")
    parser.add_argument("--adapter", type=Path, help="score this adapter instead of training one")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from lora_cli.toy.judge import Judge

    torch.set_num_threads(1)
    judge = Judge.load()
    if args.adapter:
        adapter, seconds = args.adapter, 0.0
    else:
        adapter, seconds = train_adapter(args.out / "run", args.overrides)
    before, after = load_pipeline(None), load_pipeline(adapter)
    report = {
        "preset": "presets/quickstart.yaml",
        "overrides": args.overrides,
        "samples_per_prompt": args.samples,
        "train_wall_s": round(seconds, 1),
        "before": score(before, judge, args.samples),
        "after": score(after, judge, args.samples),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "concept.json").write_text(json.dumps(report, indent=2))
    grid(before, after, 4).save(args.out / "concept.png")
    print(json.dumps(report, indent=2))
    b, a = report["before"], report["after"]
    print(
        f"held-out 'a yellow star': {b['held_out']['a yellow star']:.2f} -> {a['held_out']['a yellow star']:.2f}; "
        f"known prompts: {b['known_mean']:.2f} -> {a['known_mean']:.2f}; training {seconds:.0f} s wall"
    )


if __name__ == "__main__":
    main()
