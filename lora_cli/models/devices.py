"""Which device this process computes on, as accelerate will decide it."""

from __future__ import annotations

import os

import torch


def cpu_only() -> bool:
    """No CUDA GPU, or accelerate told to use the CPU (`ACCELERATE_USE_CPU`, `accelerate launch --cpu`), read as
    accelerate reads it."""
    from accelerate.utils import parse_flag_from_env

    return not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU")


def process_gpu() -> torch.device | None:
    """The GPU this process will use (one per process under `accelerate launch`), None on a CPU-only run."""
    return None if cpu_only() else torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def release_cached_pinned_memory() -> None:
    """Give the pinned host memory torch's caching host allocator keeps after its tensors are freed (a released
    text encoder's streamed blocks) back to the system; torch versions without `empty_host_cache` keep it."""
    empty_host_cache = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
    if empty_host_cache is not None:
        empty_host_cache()
