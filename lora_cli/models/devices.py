"""Which device this process computes on, as accelerate will decide it."""

from __future__ import annotations

import os

import torch


def cpu_only() -> bool:
    """No CUDA GPU, or accelerate told to use the CPU (`ACCELERATE_USE_CPU`, `accelerate launch --cpu`)."""
    return not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")


def process_gpu() -> torch.device | None:
    """The GPU this process will use (one per process under `accelerate launch`), None on a CPU-only run."""
    return None if cpu_only() else torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
