"""Benchmark `lora-train` on the tiny SD1.5-shaped toy model (fp32, LoRA rank 4, batch 2, 64 px, one thread).

Measured from outside the trainer, each run in a fresh subprocess with OMP_NUM_THREADS=1:

- CPU-s/step: (user + system CPU of a long run - that of a short run) / (step difference), so start-up,
  model loading, caching and saving cancel out (start-up CPU varies by ~0.5 s between runs, so the long
  run needs a few hundred steps for a per-step figure good to a few ms);
- time to first step: wall seconds from starting the process until `metrics.jsonl` gets its first line
  (written right after the first optimizer step), the lower of the two runs;
- peak RSS: the larger `ru_maxrss` of the two runs (from `os.wait4`, so it covers only that child).

Both with and without `cache.latents` + `cache.text_embeddings`. Everything happens in a temporary folder. No
peer figures here: `benchmarks/peer_compare.py` runs a peer on the same model and settings.

Run: `python benchmarks/train_speed.py [--short 20] [--long 300] [--json numbers.json]` (about a minute)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

TRAIN = "from lora_cli.cli.train import main; main()"


@dataclass
class Run:
    cpu_s: float
    first_step_s: float
    peak_rss_mib: float


@dataclass
class Result:
    cache: bool
    cpu_s_per_step: float
    first_step_s: float
    peak_rss_mib: float


def write_preset(root: Path, name: str, steps: int, cache: bool) -> Path:
    """A preset that trains `steps` steps into its own output folder."""
    preset = root / f"{name}.yaml"
    lines = [
        f"model: {{path: {root / 'tiny'}, dtype: float32}}",
        f"data: {{folder: {root / 'data'}, resolution: 64}}",
        "adapter: {rank: 4}",
        f"train: {{steps: {steps}, learning_rate: 1.0e-4, batch_size: 2, mixed_precision: 'no'}}",
        f"cache: {{latents: {str(cache).lower()}, text_embeddings: {str(cache).lower()}}}",
        f"output: {{dir: {root / name}}}",
        "logging: {every: 1}",
    ]
    preset.write_text("\n".join(lines) + "\n")
    return preset


def run_trainer(preset: Path, metrics: Path) -> Run:
    """Train in a child process; poll for the first metrics line and collect that child's rusage."""
    # HF_HUB_OFFLINE: the model is a local folder, so keep hub look-ups from adding network time.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    log = preset.with_suffix(".log")
    start = time.perf_counter()
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-c", TRAIN, str(preset), "--no-progress"], env=env, stdout=sink, stderr=sink
        )
    first_step: float | None = None
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if first_step is None and metrics.exists() and metrics.stat().st_size:
            first_step = time.perf_counter() - start
        if pid:
            break
        time.sleep(0.01)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode or first_step is None:
        sys.exit(f"lora-train failed ({process.returncode}) for {preset}:\n{log.read_text()[-3000:]}")
    return Run(usage.ru_utime + usage.ru_stime, first_step, usage.ru_maxrss / 1024)


def measure(root: Path, cache: bool, short: int, long: int) -> Result:
    """Short and long run for one configuration, combined into per-step CPU, first-step time and peak RSS."""
    runs = []
    for steps in (short, long):
        name = f"{'cached' if cache else 'plain'}-{steps}"
        runs.append(run_trainer(write_preset(root, name, steps, cache), root / name / "metrics.jsonl"))
    return Result(
        cache=cache,
        cpu_s_per_step=(runs[1].cpu_s - runs[0].cpu_s) / (long - short),
        first_step_s=min(run.first_step_s for run in runs),
        peak_rss_mib=max(run.peak_rss_mib for run in runs),
    )


def report(results: list[Result]) -> None:
    print(f"{'cache':<8}{'CPU-s/step':>12}{'first step s':>14}{'peak RSS MiB':>14}")
    for r in results:
        print(f"{'on' if r.cache else 'off':<8}{r.cpu_s_per_step:>12.3f}{r.first_step_s:>14.1f}{r.peak_rss_mib:>14.0f}")
    print("For lora-cli beside a peer on the same model and settings: python -m benchmarks.peer_compare")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", type=int, default=20, help="steps of the short run (default 20)")
    parser.add_argument("--long", type=int, default=300, help="steps of the long run (default 300)")
    parser.add_argument("--images", type=int, default=8, help="training images (default 8)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers to this JSON file")
    args = parser.parse_args()
    if not 0 < args.short < args.long:
        parser.error("need 0 < --short < --long")

    from lora_cli.toy.shapes import write_dataset
    from lora_cli.toy.tiny_pipeline import build_tiny_sd

    with tempfile.TemporaryDirectory(prefix="lora-bench-") as tmp:
        root = Path(tmp)
        build_tiny_sd(root / "tiny", seed=0)
        write_dataset(root / "data", pairs=[("yellow", "star")], per_pair=args.images, size=64, seed=0)
        results = [measure(root, cache, args.short, args.long) for cache in (False, True)]
    report(results)
    if args.json:
        numbers = {"results": [asdict(r) for r in results]}
        args.json.write_text(json.dumps(numbers, indent=2) + "\n")


if __name__ == "__main__":
    main()
