"""Run a training script unmodified and record when each optimizer step ends (CPU and wall clock).

    python -m benchmarks.step_timer OUT.json SCRIPT.py [ARGS...]      # or: ... OUT.json -c "CODE" [ARGS...]

A global torch optimizer post-hook timestamps every `optimizer.step()` (lora-cli's, a peer example's or any
other), so trainers are timed by the same clock without touching their code. On a GPU each timestamp is taken
after `torch.cuda.synchronize()`, so a step's time is the device's, not the host's queue.
"""

from __future__ import annotations

import atexit
import json
import runpy
import sys
import time


def main() -> None:
    started = time.perf_counter()  # before torch is imported: time to first step counts every import
    out, target, *rest = sys.argv[1:]
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    stamps: list[tuple[float, float]] = []

    def stamp(optimizer, args, kwargs) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        stamps.append((time.process_time(), time.perf_counter()))

    def write() -> None:
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
        with open(out, "w", encoding="utf-8") as handle:
            json.dump({"cpu": [s[0] for s in stamps], "wall": [s[1] for s in stamps], "gpu_peak_bytes": peak,
                       "started": started}, handle)  # fmt: skip

    register_optimizer_step_post_hook(stamp)
    atexit.register(write)
    if target == "-c":
        code, *rest = rest
        sys.argv = ["-c", *rest]
        exec(compile(code, "<benchmark>", "exec"), {"__name__": "__main__"})
    else:
        sys.argv = [target, *rest]
        runpy.run_path(target, run_name="__main__")


if __name__ == "__main__":
    main()
