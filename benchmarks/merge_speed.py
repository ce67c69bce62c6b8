"""Time and memory of `lora-merge` at full SD1.5 size.

Builds a random-weights SD1.5-shaped diffusers folder (860M-parameter UNet, fp32, ~4 GB) and a rank-32
LoRA over every Linear and Conv2d of the UNet, then runs `lora-merge` in a fresh process and reports wall
time and peak RSS, next to the cost of reading and writing the weight files once (a plain copy). The issue
quotes kohya's merge into a full-size SD1.5 checkpoint at 78 s and 12.7 GiB (not re-measured here); the
aim is <= 0.3x its time and <= 0.25x its memory. Needs ~10 GB of free disk.

Run: `python -m benchmarks.merge_speed` (needs GNU time at /usr/bin/time)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MERGE = "from lora_cli.cli.merge import main; main()"


def main() -> None:
    from benchmarks.adapter_swap import load_pipeline, random_adapter
    from lora_cli.toy.tiny_pipeline import build_sd15_shaped

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as root:
        base = build_sd15_shaped(Path(root) / "sd15")
        pipeline_base, _ = load_pipeline(str(base))
        adapter = Path(root) / "rank32.safetensors"
        random_adapter(pipeline_base, "lora", adapter, seed=0, targets="full", rank=32)
        del pipeline_base
        started = time.perf_counter()
        shutil.copytree(base, Path(root) / "copy")
        copy_seconds = time.perf_counter() - started
        # GNU time measures the merge process itself (a child forked from this large process would report
        # this process's memory as its own until it execs).
        command = ["/usr/bin/time", "-f", "%e %M", sys.executable, "-c", MERGE, str(base), str(adapter)]
        result = subprocess.run(
            [*command, str(Path(root) / "merged")], check=True, env=env, capture_output=True, text=True
        )
        seconds, kib = result.stderr.strip().splitlines()[-1].split()
        merge_seconds, peak = float(seconds), float(kib) / 1024
        size = sum(p.stat().st_size for p in base.rglob("*.safetensors")) / 2**30
    print(f"SD1.5-shaped folder: {size:.2f} GiB of safetensors; rank-32 LoRA on every UNet Linear/Conv2d")
    print(f"plain copy of the folder: {copy_seconds:6.1f} s")
    print(f"lora-merge:               {merge_seconds:6.1f} s wall, peak RSS {peak / 1024:.2f} GiB")
    print(f"vs kohya (quoted): {merge_seconds / 78:.2f}x time, {peak / 1024 / 12.7:.2f}x memory (targets 0.3x, 0.25x)")


if __name__ == "__main__":
    main()
