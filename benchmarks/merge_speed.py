"""Time and memory of `lora-merge` at full SD1.5 size, into a diffusers folder and into a single file.

Builds a random-weights SD1.5-shaped diffusers folder (860M-parameter UNet, fp32, ~4 GB), the same weights as
a single-file checkpoint in the original SD key layout, and a rank-32 LoRA over every Linear and Conv2d of the
UNet, then runs `lora-merge` in a fresh process for each layout and reports wall time and peak RSS, next to
the cost of reading and writing the weights once (a plain copy). The issue quotes kohya's merge into a
full-size SD1.5 checkpoint at 78 s and 12.7 GiB (not re-measured here); the aim is <= 0.3x its time and
<= 0.25x its memory. Needs ~15 GB of free disk.

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
    from lora_cli.models.single_file_writer import write_single_file
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
        shutil.rmtree(Path(root) / "copy")
        single = Path(root) / "sd15.safetensors"
        started = time.perf_counter()
        write_single_file(base, single, {})
        convert_seconds = time.perf_counter() - started
        size = sum(p.stat().st_size for p in base.rglob("*.safetensors")) / 2**30
        print(f"SD1.5-shaped weights: {size:.2f} GiB of safetensors; rank-32 LoRA on every UNet Linear/Conv2d")
        print(f"plain copy of the folder:             {copy_seconds:6.1f} s")
        print(f"folder -> single file (no merge):     {convert_seconds:6.1f} s")
        for label, source, out in (
            ("lora-merge into the diffusers folder:", base, Path(root) / "merged"),
            ("lora-merge into the single file:     ", single, Path(root) / "merged.safetensors"),
        ):
            seconds, peak = _measure_merge(source, adapter, out, env)
            print(
                f"{label} {seconds:6.1f} s wall, peak RSS {peak:.2f} GiB  "
                f"(vs kohya quoted: {seconds / 78:.2f}x time, {peak / 12.7:.2f}x memory; targets 0.3x, 0.25x)"
            )
            shutil.rmtree(out) if out.is_dir() else out.unlink()


def _measure_merge(base: Path, adapter: Path, out: Path, env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GiB) of a `lora-merge` process. GNU time measures the merge process itself
    (a child forked from this large process would report this process's memory as its own until it execs)."""
    command = ["/usr/bin/time", "-f", "%e %M", sys.executable, "-c", MERGE, str(base), str(adapter), str(out)]
    result = subprocess.run(command, check=True, env=env, capture_output=True, text=True)
    seconds, kib = result.stderr.strip().splitlines()[-1].split()
    return float(seconds), float(kib) / 2**20


if __name__ == "__main__":
    main()
