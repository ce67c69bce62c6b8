"""Does the distillation adapter make the built-in base draw in few steps, and does it stack with a concept?

Trains `presets/distill-quickstart.yaml` with `lora-train` (a subprocess, timed, one thread; or takes
`--adapter`), then has the offline judge score the nine known prompts (`--samples` images each, fixed seeds) at
`--steps` denoising steps for: the base with its own scheduler (DDIM, guidance 4, as the base is evaluated), the
base with the LCM scheduler (guidance 1), and the base + distillation adapter as `lora-sample` draws it (LCM,
guidance 1); and the base at 25 steps as the reference. With `--concept ADAPTER` (the quickstart's yellow star;
trained when not given) it also scores "a yellow star" with the concept adapter alone at 25 steps and stacked with
the distillation adapter at 4 steps. Prints a table and writes JSON.

Run: `python -m benchmarks.distill [--samples 16] [--steps 1,2,4,8] [--adapter A] [--concept B]`
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.concept import HELD_OUT, KNOWN, ROOT, TRAIN
from benchmarks.concept import train_adapter as train_concept

REFERENCE_STEPS = 25
BASE_GUIDANCE = 4.0  # the guidance the built-in base is evaluated with (lora_cli/toy/evaluation.py)


def train_distillation(out: Path) -> tuple[Path, float]:
    preset = ROOT / "presets" / "distill-quickstart.yaml"
    command = [sys.executable, "-c", TRAIN, str(preset), "--no-progress", "--overwrite", "--set", f"output.dir={out}"]
    started = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return out / "shapes-lcm.safetensors", time.perf_counter() - started


def accuracy(pipeline, judge, pairs, samples: int, seed: int, steps: int, guidance: float) -> float:
    """Mean share of images the judge accepts over the prompts of `pairs`."""
    from lora_cli.sampling import generate_images
    from lora_cli.toy.evaluation import prompt_for

    prompts = [prompt_for(c, s) for c, s in pairs for _ in range(samples)]
    images = generate_images(pipeline, prompts, [seed + i for i in range(len(prompts))], steps, guidance, "", 32)
    verdicts = judge(images)
    hits = [verdict.matches(*pairs[index // samples]) for index, verdict in enumerate(verdicts)]
    return sum(hits) / len(hits)


def pipeline_with(adapters: list[Path], scheduler: str, solver_steps: int | None = None):
    """The built-in base with these adapters applied (lora-cli's loader, as lora-sample uses it)."""
    from lora_cli.adapters.loading import load_adapter_file
    from lora_cli.config.schema import ModelSection
    from lora_cli.models import load_base
    from lora_cli.sampling.schedulers import make_scheduler

    base = load_base(ModelSection(path="builtin:shapes"))
    for adapter in adapters:
        load_adapter_file(base.trainable_components(), base.architecture, adapter)
    base.pipeline_extras["scheduler"] = make_scheduler(scheduler, base.pipeline_extras["scheduler"], solver_steps)
    return base.architecture.build_pipeline(base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=16, help="images judged per prompt (>= 16 is stable)")
    parser.add_argument("--steps", default="1,2,4,8", help="comma-separated step counts")
    parser.add_argument("--adapter", type=Path, help="score this distillation adapter instead of training one")
    parser.add_argument("--concept", type=Path, help="the quickstart adapter to stack (trained when not given)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "distill-benchmark")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from lora_cli.adapters.files import adapter_metadata
    from lora_cli.sampling.schedulers import Sampler
    from lora_cli.toy.judge import Judge

    torch.set_num_threads(1)
    judge = Judge.load()
    adapter, seconds = (args.adapter, 0.0) if args.adapter else train_distillation(args.out / "distill")
    sampler = Sampler.from_metadata(adapter_metadata(adapter))
    if sampler is None:
        raise SystemExit(f"{adapter} records no sampler: is it a distillation adapter?")
    base, base_lcm = pipeline_with([], "default"), pipeline_with([], "lcm", sampler.solver_steps)
    distilled = pipeline_with([adapter], sampler.scheduler, sampler.solver_steps)
    g = sampler.guidance_scale
    report = {"adapter": str(adapter), "train_wall_s": round(seconds, 1), "samples_per_prompt": args.samples}
    report["base_reference"] = accuracy(base, judge, KNOWN, args.samples, 20_000, REFERENCE_STEPS, BASE_GUIDANCE)
    rows = {}
    for steps in [int(s) for s in args.steps.split(",")]:
        rows[steps] = {
            "base": accuracy(base, judge, KNOWN, args.samples, 20_000, steps, BASE_GUIDANCE),
            "base_lcm": accuracy(base_lcm, judge, KNOWN, args.samples, 20_000, steps, g),
            "distilled": accuracy(distilled, judge, KNOWN, args.samples, 20_000, steps, g),
        }
    report["known"] = rows
    concept = args.concept or train_concept(args.out / "concept", [])[0]
    alone = pipeline_with([concept], "default")
    stacked = pipeline_with([adapter, concept], sampler.scheduler, sampler.solver_steps)
    report["yellow_star"] = {
        "concept_25_steps": accuracy(alone, judge, HELD_OUT, args.samples, 10_000, REFERENCE_STEPS, BASE_GUIDANCE),
        "concept_4_steps": accuracy(alone, judge, HELD_OUT, args.samples, 10_000, 4, BASE_GUIDANCE),
        "stacked_4_steps": accuracy(stacked, judge, HELD_OUT, args.samples, 10_000, 4, g),
        "stacked_known_4_steps": accuracy(stacked, judge, KNOWN, args.samples, 20_000, 4, g),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "distill.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"known prompts (base at {REFERENCE_STEPS} steps: {report['base_reference']:.2f}); training {seconds:.0f} s")
    print(f"{'steps':>5} {'base (ddim, g4)':>16} {'base (lcm, g1)':>15} {'+ adapter (lcm, g1)':>20}")
    for steps, row in rows.items():
        print(f"{steps:5d} {row['base']:16.2f} {row['base_lcm']:15.2f} {row['distilled']:20.2f}")
    star = report["yellow_star"]
    print(
        f"a yellow star: concept alone 25 steps {star['concept_25_steps']:.2f}, 4 steps "
        f"{star['concept_4_steps']:.2f}; stacked with the distillation adapter at 4 steps "
        f"{star['stacked_4_steps']:.2f} (known prompts {star['stacked_known_4_steps']:.2f})"
    )


if __name__ == "__main__":
    main()
