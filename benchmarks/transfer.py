"""Does `lora-transfer` carry the quickstart adapter to another base better than applying it as it is?

For each target derived from `builtin:shapes` (`benchmarks/derived_bases.py`: `finetuned` and `recoloured`,
trained further on shifted data; `reseeded`, the same architecture trained from another seed) the offline
judge scores "a yellow star" and the nine known prompts (`--samples` images each, fixed seeds) with: no
adapter; the quickstart adapter applied directly; the adapter carried over by `lora-transfer` with each method
asked for (rotate, project: training-free; distill: retrained on images the source draws with the adapter);
with distill, "plain": the quickstart preset trained on the target with those drawn images and the usual
denoising loss (the ablation: what matching the teacher's predictions adds); an adapter retrained on the target
with the quickstart preset and its data (the upper bound). The source base with its adapter is scored too, and
each target's per-layer similarity (`lora-info --from`) is summarised.

Run: `python -m benchmarks.transfer [--targets finetuned,recoloured,reseeded] [--samples 16] [--adapter FILE]
[--methods rotate,project,distill] [--threshold T] [--subspace-energy E] [--out runs/transfer]`. Bases and adapters
are kept in OUT and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.concept import Drawer, load_pipeline, score, train_adapter
from benchmarks.derived_bases import KINDS, derive

ROOT = Path(__file__).resolve().parent.parent
SOURCE = "builtin:shapes"
TRANSFER = "from lora_cli.cli.transfer import main; main()"


def adapter_on(base: str, folder: Path) -> Path:
    """The quickstart adapter trained on `base` (reused when `folder` already holds it)."""
    existing = folder / "yellow-star.safetensors"
    if existing.exists():
        return existing
    return train_adapter(folder, [f"model.path={base}"])[0]


def carried(adapter: Path, target: Path, out: Path, options: list[str]) -> tuple[Path | None, str]:
    """`lora-transfer`'s file (None when it refuses: nothing similar enough) and its last output line."""
    out.unlink(missing_ok=True)
    shutil.rmtree(out.with_name(out.stem + ".transfer"), ignore_errors=True)  # distill's work: start afresh
    command = [sys.executable, "-c", TRANSFER, str(adapter), str(out), "--from", SOURCE, "--to", str(target)]
    command += options
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    last = (done.stdout or done.stderr).strip().splitlines()[-1]
    return (out if done.returncode == 0 else None), last


def plain_on_teacher_images(work: Path, target: Path) -> Path:
    """The quickstart preset trained on `target` with the images distill's teacher drew as its data and the usual
    denoising objective: what distillation adds over plain training on the same images."""
    (teacher,) = (work / "teacher").iterdir()
    return train_adapter(work / "plain", [f"model.path={target}", f"data.folder={teacher}"])[0]


def similarity_summary(adapter: Path, target: Path, threshold: float, energy: float) -> dict:
    from lora_cli.toolbox.info import carry_over_summary

    summary = carry_over_summary(adapter, SOURCE, str(target), threshold, energy, "rotate")
    change = [layer["change"] for layer in summary["layers"].values()]
    return {
        "mean_similarity": summary["mean_similarity"],
        "similar_layers": summary["similar_layers"],
        "layers": len(summary["layers"]),
        "mean_change": round(sum(change) / len(change), 4),
    }


def scores(drawer: Drawer, judge, samples: int) -> dict[str, float]:
    found = score(drawer, judge, samples)
    return {"yellow_star": found["held_out"]["a yellow star"], "known": round(found["known_mean"], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default=",".join(KINDS))
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--adapter", type=Path, help="the quickstart adapter (trained when not given)")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--subspace-energy", type=float, default=0.99)
    parser.add_argument("--methods", default="rotate,project,distill", help="comma-separated lora-transfer methods")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "transfer")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from lora_cli.toy.judge import Judge

    torch.set_num_threads(1)
    judge = Judge.load()
    adapter = args.adapter or adapter_on(SOURCE, args.out / "adapters" / "source")
    methods = args.methods.split(",")
    report: dict = {"samples_per_prompt": args.samples, "threshold": args.threshold}
    report.update(subspace_energy=args.subspace_energy, methods=methods)
    subspace = ["--threshold", str(args.threshold), "--subspace-energy", str(args.subspace_energy)]
    report["source"] = scores(load_pipeline(adapter), judge, args.samples)
    for kind in args.targets.split(","):
        target = derive(kind, args.out / "bases" / kind)
        rows: dict[str, Path | None] = {"no adapter": None, "direct": adapter}
        lines = {}
        for method in methods:
            options = ["--method", method, *(subspace if method != "distill" else [])]
            rows[method], lines[method] = carried(adapter, target, args.out / f"carried-{kind}-{method}.safetensors",
                                                  options)  # fmt: skip
        if rows.get("distill"):  # the ablation: the same preset on the teacher's images, without the teacher
            rows["plain"] = plain_on_teacher_images(args.out / f"carried-{kind}-distill.transfer", target)
        rows["retrained"] = adapter_on(str(target), args.out / "adapters" / kind)
        report[kind] = {
            "transfer": lines,
            "similarity": similarity_summary(adapter, target, args.threshold, args.subspace_energy),
            **{row: scores(load_pipeline(path, str(target)), judge, args.samples) for row, path in rows.items()},
        }
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"transfer-threshold{args.threshold}-" + args.targets.replace(",", "-") + ".json"
    (args.out / name).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"{'target':10} {'adapter':12} {'yellow star':>12} {'known':>6}")
    print(f"{'source':10} {'quickstart':12} {report['source']['yellow_star']:12.2f} {report['source']['known']:6.2f}")
    for kind in args.targets.split(","):
        for row in ("no adapter", "direct", *methods, "plain", "retrained"):
            if (found := report[kind].get(row)) is None:
                continue
            print(f"{kind:10} {row:12} {found['yellow_star']:12.2f} {found['known']:6.2f}")


if __name__ == "__main__":
    main()
