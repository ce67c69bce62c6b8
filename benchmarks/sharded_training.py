"""DDP against FSDP on two CPU processes (gloo): what each process holds, and the time per step.

Builds the Flux-shaped pipeline of `quantized_base.py` (random weights, ~280M-parameter transformer stored in
bf16), then for `ddp`, `fsdp` and `fsdp-keep` (FSDP with `distributed.reshard_after_forward: false`) starts 2
processes with torchrun; each builds lora-cli's own training session (a rank-16 LoRA on every Linear, batch 1
per process, bf16 autocast), trains `--steps` steps and reports:
- the denoiser's weights held by the process (its shard under FSDP);
- the process's resident memory (RSS) once the session is built and its peak over the training steps after
  the first (glibc is told to return freed blocks above 1 MiB to the system at once, so RSS follows live
  memory instead of what the heap kept);
- wall-clock seconds per step (one thread per process; FSDP gathers every block's weights over gloo).

Run: `python benchmarks/sharded_training.py [--steps 10]`
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
STRATEGIES = ("ddp", "fsdp", "fsdp-keep")


def resident_bytes() -> int:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) * 1024


class PeakSampler:
    """The largest RSS seen every few milliseconds while it runs."""

    def __init__(self) -> None:
        self.peak, self.running = resident_bytes(), True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, resident_bytes())
            time.sleep(0.005)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return self.peak


def worker(base: Path, data: Path, strategy: str, steps: int, out: Path) -> None:
    """One process of the run (started by torchrun): build the session, train, write this rank's numbers."""
    import gc

    from lora_cli.config import validate_preset
    from lora_cli.training.loop import optimizer_step
    from lora_cli.training.session import build_session, prepare_model, run_paths, scan_dataset
    from lora_cli.training.sharding import sharding_summary

    raw = {
        "model": {"path": str(base), "dtype": "bfloat16", "max_text_tokens": 16},
        "data": {"folder": str(data), "resolution": 64},
        "adapter": {"rank": 16, "alpha": 16, "targets": "full"},
        "train": {"steps": steps, "learning_rate": 1e-3, "batch_size": 1, "mixed_precision": "bf16"},
        "distributed": {"strategy": strategy.removesuffix("-keep"), "reshard_after_forward": "keep" not in strategy},
        "output": {"dir": str(out / strategy)},
    }
    preset = validate_preset(raw, strategy)
    base_model, adapter, training_data = prepare_model(preset, scan_dataset(preset))
    session = build_session(preset, run_paths(preset), base_model, adapter, training_data)
    gc.collect()
    built = resident_bytes()
    optimizer_step(session)  # the first step allocates what every later one reuses
    sampler = PeakSampler()
    started = time.perf_counter()
    while session.step < session.total_steps:
        optimizer_step(session)
    seconds = (time.perf_counter() - started) / (steps - 1)
    peak = sampler.stop()
    summary = sharding_summary(session.base.denoiser, session.accelerator.num_processes)
    held = summary.split("holds ")[1].split(" (")[0] if session.sharded else "all"
    rank = session.accelerator.process_index
    report = {"held": held, "built_mib": built / 2**20, "peak_mib": peak / 2**20, "s_per_step": seconds}
    (out / f"{strategy}-{rank}.json").write_text(json.dumps(report))
    session.accelerator.end_training()


def launch(base: Path, data: Path, strategy: str, steps: int, out: Path) -> list[dict]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__]
    command += ["--worker", strategy, "--base", str(base), "--data", str(data), "--steps", str(steps)]
    command += ["--out", str(out)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "1048576"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return [json.loads((out / f"{strategy}-{rank}.json").read_text()) for rank in range(2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--worker", choices=STRATEGIES)
    parser.add_argument("--base", type=Path)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.worker:
        worker(args.base, args.data, args.worker, args.steps, args.out)
        return

    from benchmarks.quantized_base import build
    from lora_cli.toy.shapes import write_dataset

    with tempfile.TemporaryDirectory() as root:
        work = Path(root)
        base = build(work / "flux-280m")
        data = work / "data"
        write_dataset(data, [("yellow", "star"), ("red", "circle")], per_pair=3, size=64, seed=1)
        print(f"{'strategy':<10}{'rank':>5}{'weights held':>14}{'RSS built':>12}{'RSS peak':>11}{'s/step':>9}")
        for strategy in STRATEGIES:
            for rank, row in enumerate(launch(base, data, strategy, args.steps, work)):
                print(
                    f"{strategy:<10}{rank:>5}{row['held']:>14}{row['built_mib']:>8.0f} MiB{row['peak_mib']:>7.0f} MiB"
                    f"{row['s_per_step']:>9.2f}"
                )


if __name__ == "__main__":
    main()
