"""Does the distillation adapter make the built-in base draw in few steps, and does it stack with a concept?

Trains `--preset` (`presets/distill-quickstart.yaml`, LCM on builtin:shapes; or
`presets/distill-quickstart-dit.yaml`, reflow on builtin:shapes-dit) with `lora-train` (a subprocess, timed, one
thread; or takes `--adapter`), then has the offline judge score the nine known prompts (`--samples` images each,
fixed seeds) at `--steps` denoising steps for: the base with its own scheduler at the guidance it is scored at
(lora_cli/toy/evaluation.py: 4 for builtin:shapes, 2 for builtin:shapes-dit), the base with the adapter's
few-step scheduler alone (LCM, guidance 1), and the base + distillation adapter as `lora-sample` draws it (its
recorded sampler); and the base at 25 steps as the reference. Unless
`--no-concept`, it also scores "a yellow star" with the base's quickstart adapter (`--concept`, trained when not
given) alone at 25 steps and stacked with the distillation adapter at 4 steps. Prints a table and writes JSON.

Run: `python -m benchmarks.distill [--preset P] [--samples 16] [--steps 1,2,4,8] [--adapter A] [--concept B]`
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
PRESETS = ROOT / "presets"
CONCEPTS = {"builtin:shapes": PRESETS / "quickstart.yaml", "builtin:shapes-dit": PRESETS / "quickstart-dit.yaml"}


def train_distillation(preset: Path, out: Path) -> tuple[Path, float]:
    from lora_cli.config import load_preset

    command = [sys.executable, "-c", TRAIN, str(preset), "--no-progress", "--overwrite", "--set", f"output.dir={out}"]
    started = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return out / f"{load_preset(preset).output.name}.safetensors", time.perf_counter() - started


class Drawing:
    """A built-in base with adapters applied (lora-cli's loader, as lora-sample uses it) and a scheduler."""

    def __init__(self, base_path: str, adapters: list[Path], scheduler: str, solver_steps: int | None = None):
        from lora_cli.adapters.loading import load_adapter_file
        from lora_cli.config.schema import ModelSection
        from lora_cli.models import load_base
        from lora_cli.sampling.schedulers import make_scheduler

        base = load_base(ModelSection(path=base_path))
        for adapter in adapters:
            load_adapter_file(base.trainable_components(), base.architecture, adapter)
        extras = base.pipeline_extras
        extras["scheduler"] = make_scheduler(scheduler, extras["scheduler"], solver_steps)
        self.pipeline, self.text_tokens = base.architecture.build_pipeline(base), extras.get("text_tokens")

    def accuracy(self, judge, pairs, samples: int, seed: int, steps: int, guidance: float) -> float:
        """Mean share of images the judge accepts over the prompts of `pairs`."""
        from lora_cli.sampling import generate_images
        from lora_cli.toy.evaluation import prompt_for

        prompts = [prompt_for(c, s) for c, s in pairs for _ in range(samples)]
        seeds = [seed + i for i in range(len(prompts))]
        images = generate_images(self.pipeline, prompts, seeds, steps, guidance, "", 32, text_tokens=self.text_tokens)
        verdicts = judge(images)
        hits = [verdict.matches(*pairs[index // samples]) for index, verdict in enumerate(verdicts)]
        return sum(hits) / len(hits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", type=Path, default=PRESETS / "distill-quickstart.yaml")
    parser.add_argument("--samples", type=int, default=16, help="images judged per prompt (>= 16 is stable)")
    parser.add_argument("--steps", default="1,2,4,8", help="comma-separated step counts")
    parser.add_argument("--adapter", type=Path, help="score this distillation adapter instead of training one")
    parser.add_argument("--concept", type=Path, help="the quickstart adapter to stack (trained when not given)")
    parser.add_argument("--no-concept", action="store_true", help="skip the stacking measurement")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "distill-benchmark")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from lora_cli.adapters.files import adapter_metadata
    from lora_cli.config import load_preset
    from lora_cli.sampling.schedulers import Sampler
    from lora_cli.toy.judge import Judge

    torch.set_num_threads(1)
    judge = Judge.load()
    base_path = load_preset(args.preset).model.path
    adapter, seconds = (args.adapter, 0.0) if args.adapter else train_distillation(args.preset, args.out / "distill")
    sampler = Sampler.from_metadata(adapter_metadata(adapter))
    if sampler is None:
        raise SystemExit(f"{adapter} records no sampler: is it a distillation adapter?")
    from lora_cli.toy.evaluation import guidance_for

    base_guidance = guidance_for(base_path)  # what the base is scored at without an adapter
    base, g = Drawing(base_path, [], "default"), sampler.guidance_scale
    columns = {"base": (base, base_guidance)}
    if sampler.scheduler != "default":  # the few-step scheduler alone, without the adapter
        columns[f"base_{sampler.scheduler}"] = (Drawing(base_path, [], sampler.scheduler, sampler.solver_steps), g)
    columns["distilled"] = (Drawing(base_path, [adapter], sampler.scheduler, sampler.solver_steps), g)
    report = {"preset": str(args.preset), "adapter": str(adapter), "train_wall_s": round(seconds, 1)}
    report["samples_per_prompt"] = args.samples
    report["base_reference"] = base.accuracy(judge, KNOWN, args.samples, 20_000, REFERENCE_STEPS, base_guidance)
    rows = {}
    for steps in [int(s) for s in args.steps.split(",")]:
        rows[steps] = {
            name: drawing.accuracy(judge, KNOWN, args.samples, 20_000, steps, guidance)
            for name, (drawing, guidance) in columns.items()
        }
    report["known"] = rows
    if not args.no_concept:
        concept = args.concept or train_concept(args.out / "concept", [], CONCEPTS[base_path])[0]
        alone = Drawing(base_path, [concept], "default")
        stacked = Drawing(base_path, [adapter, concept], sampler.scheduler, sampler.solver_steps)
        report["yellow_star"] = {
            "concept_25_steps": alone.accuracy(judge, HELD_OUT, args.samples, 10_000, REFERENCE_STEPS, base_guidance),
            "concept_4_steps": alone.accuracy(judge, HELD_OUT, args.samples, 10_000, 4, base_guidance),
            "stacked_4_steps": stacked.accuracy(judge, HELD_OUT, args.samples, 10_000, 4, g),
            "stacked_known_4_steps": stacked.accuracy(judge, KNOWN, args.samples, 20_000, 4, g),
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "distill.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"known prompts (base at {REFERENCE_STEPS} steps: {report['base_reference']:.2f}); training {seconds:.0f} s")
    print(f"{'steps':>5} " + " ".join(f"{name:>12}" for name in columns))
    for steps, row in rows.items():
        print(f"{steps:5d} " + " ".join(f"{row[name]:12.2f}" for name in columns))
    if "yellow_star" in report:
        star = report["yellow_star"]
        print(
            f"a yellow star: concept alone 25 steps {star['concept_25_steps']:.2f}, 4 steps "
            f"{star['concept_4_steps']:.2f}; stacked with the distillation adapter at 4 steps "
            f"{star['stacked_4_steps']:.2f} (known prompts {star['stacked_known_4_steps']:.2f})"
        )


if __name__ == "__main__":
    main()
