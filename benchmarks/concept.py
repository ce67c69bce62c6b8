"""Does the quickstart adapter teach the built-in base a new concept without making it forget?

Trains `presets/quickstart.yaml` (or `--preset presets/quickstart-dit.yaml`) with `lora-train` (in a subprocess,
timed) for each adapter type asked for, then has the offline judge score the base and the base + adapter
(loaded by lora-cli's adapter loader, which reads every algorithm; for LoRA it matches diffusers'
`load_lora_weights`, see tests) on the held-out prompt "a yellow star" and the nine known prompts, `--samples`
images each with fixed seeds. Writes JSON and, per adapter type, a PNG grid (rows: prompts; columns: samples
before | after).

Run: `python benchmarks/concept.py [--types lora,locon,loha,lokr,dora] [--samples 16] [--preset P] [--set K=V ...]`
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
HELD_OUT = [("yellow", "star")]
KNOWN = [(c, s) for c in ("red", "green", "blue") for s in ("circle", "square", "triangle")]
TRAIN = "from lora_cli.cli.train import main; main()"


QUICKSTART = ROOT / "presets" / "quickstart.yaml"


def train_adapter(out: Path, overrides: list[str], preset: Path = QUICKSTART) -> tuple[Path, float]:
    """Train `preset` with lora-train (one thread) into `out`; returns the adapter and the wall time."""
    from lora_cli.config import load_preset

    command = [sys.executable, "-c", TRAIN, str(preset), "--no-progress", "--overwrite"]
    command += ["--set", f"output.dir={out}", *[arg for o in overrides for arg in ("--set", o)]]
    started = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return out / f"{load_preset(preset).output.name}.safetensors", time.perf_counter() - started


TYPE_OVERRIDES = {
    "lora": ["adapter.type=lora"],
    "locon": ["adapter.type=locon"],
    "loha": ["adapter.type=loha"],
    "lokr": ["adapter.type=lokr"],
    "dora": ["adapter.type=lora", "adapter.dora=true"],
}


class Drawer(NamedTuple):
    """A loaded pipeline, the T5 length its base reads (None: no T5) and the guidance its base is scored at."""

    pipeline: Any
    text_tokens: int | None
    guidance: float


def load_pipeline(adapter: Path | None, base_path: str = "builtin:shapes") -> Drawer:
    from lora_cli.adapters.loading import load_adapter_file
    from lora_cli.config.schema import ModelSection
    from lora_cli.models import load_base
    from lora_cli.toy.evaluation import guidance_for

    base = load_base(ModelSection(path=base_path))
    if adapter is not None:
        load_adapter_file(base.trainable_components(), base.architecture, adapter)
    pipeline = base.architecture.build_pipeline(base)
    return Drawer(pipeline, base.pipeline_extras.get("text_tokens"), guidance_for(base_path))


def score(drawer: Drawer, judge, samples: int) -> dict[str, dict[str, float]]:
    from lora_cli.toy.evaluation import pair_accuracy

    options = {"text_tokens": drawer.text_tokens, "guidance": drawer.guidance}
    held = pair_accuracy(drawer.pipeline, judge, HELD_OUT, samples, seed=10_000, **options)
    known = pair_accuracy(drawer.pipeline, judge, KNOWN, samples, seed=20_000, **options)
    return {"held_out": held, "known": known, "known_mean": sum(known.values()) / len(known)}


def grid(before: Drawer, after: Drawer, count: int) -> Image.Image:
    from lora_cli.sampling import generate_images, image_grid
    from lora_cli.toy.evaluation import SAMPLE_STEPS, prompt_for

    prompts = [prompt_for(c, s) for c, s in HELD_OUT + KNOWN[::4]]
    rows = []
    for prompt in prompts:
        seeds, row = list(range(count)), []
        for drawer in (before, after):
            row += generate_images(drawer.pipeline, [prompt] * count, seeds, SAMPLE_STEPS, drawer.guidance, "", 32,
                                   text_tokens=drawer.text_tokens)  # fmt: skip
        rows.append(row)
    return image_grid(rows, prompts, [f"before {i}" for i in range(count)] + [f"after {i}" for i in range(count)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", default="lora", help=f"comma-separated, from {','.join(TYPE_OVERRIDES)}")
    parser.add_argument("--samples", type=int, default=16, help="images judged per prompt (>= 16 is stable)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="preset override")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "concept")
    parser.add_argument("--adapter", type=Path, help="score this adapter instead of training one")
    parser.add_argument("--preset", type=Path, default=QUICKSTART,
                        help="the quickstart to train: presets/quickstart.yaml (builtin:shapes) or "
                        "presets/quickstart-dit.yaml (builtin:shapes-dit)")  # fmt: skip
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from lora_cli.config import load_preset
    from lora_cli.toy.judge import Judge

    torch.set_num_threads(1)
    judge = Judge.load()
    base_path = load_preset(args.preset).model.path
    before = load_pipeline(None, base_path)
    report = {"preset": str(args.preset), "overrides": args.overrides, "samples_per_prompt": args.samples}
    report["base"] = score(before, judge, args.samples)
    runs = {"given": (args.adapter, 0.0)} if args.adapter else {}
    for kind in [] if args.adapter else args.types.split(","):
        runs[kind] = train_adapter(args.out / kind, TYPE_OVERRIDES[kind] + args.overrides, args.preset)
    args.out.mkdir(parents=True, exist_ok=True)
    for kind, (adapter, seconds) in runs.items():
        after = load_pipeline(adapter, base_path)
        report[kind] = {"train_wall_s": round(seconds, 1), **score(after, judge, args.samples)}
        grid(before, after, 4).save(args.out / f"concept-{kind}.png")
    (args.out / "concept.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    base = report["base"]
    print(f"{'adapter':8} {'yellow star':>12} {'known prompts':>14} {'train s':>8}")
    print(f"{'base':8} {base['held_out']['a yellow star']:12.2f} {base['known_mean']:14.2f}")
    for kind in runs:
        row = report[kind]
        held, known, seconds = row["held_out"]["a yellow star"], row["known_mean"], row["train_wall_s"]
        print(f"{kind:8} {held:12.2f} {known:14.2f} {seconds:8.0f}")


if __name__ == "__main__":
    main()
