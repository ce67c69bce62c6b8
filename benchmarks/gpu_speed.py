"""The GPU table: speed, time to the first step and peak memory of lora-cli on a CUDA machine, beside the diffusers
DreamBooth LoRA example on the same model and data, with the `--plan` estimate beside each run.

    python -m benchmarks.gpu_speed [--diffusers-examples DIR] [--deadline 470] [--work DIR] [--small]

Cases (random weights, nothing downloaded; models are built first, about 1 minute on a GPU machine):
  SD1.5 architecture, 512 px, batch 4, LoRA rank 16 on attention, bf16 (base stored in bf16), AdamW, 80 steps:
    lora-cli with latents + text cached, the same with `train.compile: true`, lora-cli with nothing cached,
    and the example (text embeddings precomputed; it VAE-encodes every step) when DIR is given;
  a ~1.2B Flux-shaped DiT (24 heads x 128, 2 double + 4 single blocks), 512 px, batch 1, LoRA rank 16 on every
    Linear, 40 steps: the base in nf4, in bf16 (which must train: its loss is printed first and last), in fp8
    and in int8 (quantized on the CPU, then moved: bitsandbytes keeps int8 statistics beside the weight);
  the README's quickstart (builtin:shapes, 1,600 steps), wall time.
Each run is a fresh process timed by `benchmarks.step_timer` (s/step: median optimizer-step interval after the
first quarter); GPU peak is nvidia-smi's (CUDA context included, as the planner estimates it). A case that would
run past `--deadline` seconds is skipped and says so. `--small` is a CPU dry run of the same script with tiny
models (64 px, a few steps): it checks the script, not the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from benchmarks.peer_compare import PROMPT, TRAIN, Settings, lora_cli_command, lora_cli_preset, peer_command

ROOT = Path(__file__).parents[1]


@dataclass
class Case:
    name: str
    command: list[str]  # a script (or -c CODE) and its arguments, as step_timer takes them
    plan: dict | None = None  # the lora-cli preset, for --plan
    timeout: int = 180
    losses_from: Path | None = None  # a metrics.jsonl whose first and last loss are reported


class GpuMemoryPeak:
    """Polls nvidia-smi every 50 ms while a run lasts; the peak in MiB (None without nvidia-smi)."""

    def __init__(self) -> None:
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> GpuMemoryPeak:
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _poll(self) -> None:
        query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
        while not self._stop.wait(0.05):
            used = subprocess.run(query, capture_output=True, text=True).stdout.split()
            if used:
                self.peak = max(self.peak or 0, int(used[0]))


def build_inputs(work: Path, small: bool) -> dict[str, Path]:
    """The SD1.5-architecture and Flux-shaped models and a dataset of 16 images with one caption."""
    from lora_cli.toy.shapes import write_dataset
    from lora_cli.toy.tiny_dits import build_tiny_flux
    from lora_cli.toy.tiny_pipeline import build_sd15_shaped, build_tiny_sd

    paths = {"sd15": work / "sd15", "flux": work / "flux", "data": work / "data"}
    if not paths["data"].exists():
        size = 64 if small else 512
        write_dataset(paths["data"], [("red", "circle"), ("blue", "square")], per_pair=8, size=size, seed=0)
        for caption in paths["data"].glob("*.txt"):
            caption.write_text(PROMPT)
    if not paths["sd15"].exists():
        (build_tiny_sd if small else build_sd15_shaped)(paths["sd15"], seed=0)
    if not paths["flux"].exists():
        shape = (
            {"heads": 4, "head_dim": 16, "blocks": (1, 1)}
            if small
            else {"heads": 24, "head_dim": 128, "blocks": (2, 4)}
        )
        build_tiny_flux(paths["flux"], seed=0, **shape)
    return paths


def cases(work: Path, paths: dict[str, Path], examples: Path | None, small: bool) -> list[Case]:
    steps, flux_steps = (6, 4) if small else (80, 40)
    sd = Settings(steps=steps, resolution=64 if small else 512, batch=4, rank=16, cached=True)
    cached = lora_cli_preset(paths["sd15"], paths["data"], work / "lc-sd15", sd)
    compiled = _with(cached, {"train": {"compile": True}, "output": {"dir": str(work / "lc-sd15-compile")}})
    uncached_settings = Settings(sd.steps, sd.resolution, sd.batch, sd.rank, cached=False)
    uncached = lora_cli_preset(paths["sd15"], paths["data"], work / "lc-sd15-nc", uncached_settings)
    found = [
        Case("lora-cli SD1.5-arch, latents + text cached", _train(cached, work / "sd15.yaml"), cached),
        Case("same, train.compile: true", _train(compiled, work / "sd15-compile.yaml"), compiled, timeout=300),
        Case("lora-cli SD1.5-arch, nothing cached", _train(uncached, work / "sd15-nc.yaml"), uncached),
    ]
    if examples is not None:
        peer = peer_command(examples, paths["sd15"], paths["data"], work / "df-sd15", sd)
        found.append(Case("diffusers dreambooth LoRA example (text embeddings precomputed)", peer))
    for quantize in ("nf4", "none", "fp8", "int8"):
        out = work / f"flux-{quantize}"
        flux = {
            "model": {"path": str(paths["flux"]), "dtype": "bfloat16", "quantize": quantize, "max_text_tokens": 16},
            "adapter": {"type": "lora", "rank": 16, "alpha": 16, "targets": "full"},
            "data": {"folder": str(paths["data"]), "resolution": sd.resolution},
            "train": {"steps": flux_steps, "batch_size": 1, "learning_rate": 1e-4, "mixed_precision": sd.precision,
                      "seed": 0},
            "output": {"dir": str(out)},
        }  # fmt: skip
        label = "bf16 base" if quantize == "none" else f"{quantize} base"
        name = f"lora-cli Flux-shaped {'tiny' if small else '1.2B'}, {label}, rank 16 on every Linear, batch 1"
        found.append(Case(name, _train(flux, work / f"flux-{quantize}.yaml"), flux, 180, out / "metrics.jsonl"))
    if not small:
        quickstart = ["-c", TRAIN, str(ROOT / "presets" / "quickstart.yaml"), "--no-progress", "--overwrite",
                      "--set", f"output.dir={work / 'quickstart'}"]  # fmt: skip
        found.append(Case("quickstart (builtin:shapes, 1,600 steps)", quickstart, timeout=240))
    return found


def _with(preset: dict, changes: dict) -> dict:
    return {key: {**value, **changes.get(key, {})} for key, value in preset.items()}


def _train(preset: dict, path: Path) -> list[str]:
    return lora_cli_command({"version": 1, **preset}, path, "--overwrite")


def plan_peak(preset: dict, path: Path) -> str:
    """The peak the planner estimates for `preset` (GPU on a GPU machine, RAM on a CPU one)."""
    path.write_text(yaml.safe_dump({"version": 1, **preset}))
    result = subprocess.run([sys.executable, "-c", TRAIN, str(path), "--plan"], capture_output=True, text=True)
    found = re.search(r"(?:GPU memory|RAM) peak: ([\d.]+ [KMG]iB)", result.stdout + result.stderr)
    return found.group(1) if found else f"failed (exit {result.returncode})"


def run_with_rusage(command: list[str], log: Path, limit: float) -> tuple[int | None, int, int]:
    """Run `command` from the project root, its output into `log`; (its exit code, or None when it was killed
    after `limit` seconds; its peak RSS in bytes, from its own rusage; its peak RssAnon + RssShmem, sampled
    every 50 ms: RSS without the file pages of memory-mapped weights, which the kernel can drop; CUDA's pinned
    host memory may count as shared memory)."""
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT)
    killed, done = threading.Event(), threading.Event()
    anonymous = [0]

    def sample() -> None:
        status = Path(f"/proc/{process.pid}/status")
        while not done.wait(0.05):
            try:
                lines = [line for line in status.read_text().splitlines() if line.startswith(("RssAnon:", "RssShmem:"))]
            except OSError:  # gone
                continue
            anonymous[0] = max(anonymous[0], sum(int(line.split()[1]) * 1024 for line in lines))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    timer = threading.Timer(limit, lambda: (killed.set(), process.kill()))
    timer.start()
    try:
        _, status, usage = os.wait4(process.pid, 0)
    finally:
        timer.cancel()
        done.set()
        sampler.join()
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    return (None if killed.is_set() else process.returncode), usage.ru_maxrss * 1024, anonymous[0]


def run_case(case: Case, work: Path, limit: float) -> dict[str, object]:
    name = re.sub(r"[^a-z0-9]+", "-", case.name.lower())[:40]
    stamps, log = work / f"{name}.json", work / f"{name}.log"
    stamps.unlink(missing_ok=True)
    run = [sys.executable, "-m", "benchmarks.step_timer", str(stamps), *case.command]
    began = time.perf_counter()
    with GpuMemoryPeak() as memory:
        returncode, rss, anonymous = run_with_rusage(run, log, min(case.timeout, limit))
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
    if returncode is None:
        tail = [f"not finished after {min(case.timeout, limit):.0f} s"]
    row: dict[str, object] = {
        "run": case.name,
        "wall_s": round(time.perf_counter() - began, 1),
        "gpu_peak_mib": memory.peak,
        "ram_peak_mib": round(rss / 2**20),
        "anonymous_peak_mib": round(anonymous / 2**20),
    }
    if stamps.exists():
        times = json.loads(stamps.read_text())
        wall = times["wall"]
        skip = max(1, len(wall) // 4)
        intervals = [b - a for a, b in zip(wall[skip:], wall[skip + 1 :], strict=False)]
        row.update(steps=len(wall), first_step_s=round(wall[0] - times["started"], 1) if wall else None)
        if times.get("gpu_peak_bytes"):
            row["allocator_peak_mib"] = round(times["gpu_peak_bytes"] / 2**20)
        row["s_per_step"] = round(statistics.median(intervals), 4) if intervals else None
    if returncode != 0:
        row["failed"] = f"exit {returncode}: {tail[0][:160]}" if returncode is not None else tail[0]
    if case.losses_from is not None and case.losses_from.exists():
        losses = [json.loads(line)["loss"] for line in case.losses_from.read_text().splitlines()]
        head, end = losses[: max(1, len(losses) // 4)], losses[-max(1, len(losses) // 4) :]
        row["loss"] = f"{statistics.mean(head):.4f} -> {statistics.mean(end):.4f}"
    return row


Column = tuple[str, Callable[[dict[str, object]], object]]  # a table's heading and how a row fills it


def speed(row: dict[str, object]) -> object:
    """The s/step cell: the figure, or why there is none."""
    return row.get("failed") or row.get("skipped") or row.get("s_per_step", "")


COLUMNS: tuple[Column, ...] = (
    ("run", lambda row: row["run"]),
    ("s/step", speed),
    ("first step (s)", lambda row: row.get("first_step_s", "")),
    ("GPU peak (MiB)", lambda row: row.get("gpu_peak_mib") or ""),
    ("--plan", lambda row: row.get("plan", "")),
    ("loss (first -> last quarter)", lambda row: row.get("loss", "")),
)


def print_table(rows: list[dict[str, object]], header: Callable[[], str], columns: Sequence[Column] = COLUMNS) -> None:
    print(header())
    print("| " + " | ".join(name for name, _ in columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(cell(row)) for _, cell in columns) + " |")


def environment() -> str:
    import accelerate
    import diffusers
    import peft
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (dry run)"
    versions = f"torch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}"
    return f"{time.strftime('%Y-%m-%d')}, {device}, {versions}, accelerate {accelerate.__version__}"


@contextmanager
def work_folder(chosen: Path | None) -> Iterator[Path]:
    """`chosen` (created if missing), else a temporary folder removed afterwards."""
    if chosen is not None:
        chosen.mkdir(parents=True, exist_ok=True)
        yield chosen
        return
    with tempfile.TemporaryDirectory() as scratch:
        yield Path(scratch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--diffusers-examples", type=Path, help="diffusers' examples/ folder (the peer's script)")
    parser.add_argument("--deadline", type=float, default=470, help="seconds for the whole table")
    parser.add_argument("--work", type=Path, help="where models and runs go (default: a temporary folder)")
    parser.add_argument("--small", action="store_true", help="CPU dry run with tiny models")
    args = parser.parse_args()
    began = time.perf_counter()
    with work_folder(args.work) as work:
        paths = build_inputs(work, args.small)
        print(f"models built in {time.perf_counter() - began:.0f} s", flush=True)
        rows = []
        for case in cases(work, paths, args.diffusers_examples, args.small):
            left = args.deadline - (time.perf_counter() - began)
            if left < 30:
                rows.append({"run": case.name, "skipped": "skipped (deadline)"})
                continue
            row = run_case(case, work, left)
            if case.plan is not None:
                row["plan"] = plan_peak(case.plan, work / "plan.yaml")
            rows.append(row)
            print(json.dumps(row), flush=True)
        print_table(rows, environment)


if __name__ == "__main__":
    main()
