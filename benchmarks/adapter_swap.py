"""Switching adapters on one loaded base vs. reloading the pipeline for each adapter.

Loads `builtin:shapes` (or `--base`), writes `--adapters` random rank-8 adapters covering every Linear and
Conv2d of the UNet (LoRA, LoHa and LoKr in turn), then times, on one thread:
- a pipeline load (`load_base` + building the pipeline), the cost of reloading per adapter;
- one switch with lora-sample's weight patcher (restore the base weights, apply the next adapter).
Target: a switch costs <= 1% of a pipeline load.

Run: `python benchmarks/adapter_swap.py [--adapters 6] [--repeats 5] [--base builtin:shapes]`
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def load_pipeline(base_path: str):
    from lora_cli.config.schema import ModelSection
    from lora_cli.models import load_base

    base = load_base(ModelSection(path=base_path))
    return base, base.architecture.build_pipeline(base)


def random_adapter(base, kind: str, path: Path, seed: int) -> None:
    """A trained-looking adapter: peft layers injected with random weights, saved like lora-train does."""
    import torch

    from lora_cli.adapters.injection import inject_spec
    from lora_cli.adapters.registry import AdapterSpec
    from lora_cli.adapters.targets import adaptable_module_names
    from lora_cli.io.adapter_file import save_adapter

    unet = type(base.denoiser).from_config(base.denoiser.config)  # a scratch copy; the base stays clean
    targets = {"unet": adaptable_module_names(unet)}
    adapter = inject_spec({"unet": unet}, AdapterSpec(kind, 8, 4.0), targets, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    for param in adapter.parameters("unet"):
        param.data = 0.01 * torch.randn(param.shape, generator=generator)
    table = base.architecture.kohya_table
    save_adapter(path, adapter.tensors(), adapter.ranks(), adapter.algorithm, "kohya", table, {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="builtin:shapes")
    parser.add_argument("--adapters", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from lora_cli.sampling.patcher import WeightPatcher

    torch.set_num_threads(1)
    load_pipeline(args.base)  # warm imports and file caches, as a long-running sampler would be
    loads = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        base, _ = load_pipeline(args.base)
        loads.append(time.perf_counter() - started)
    kinds = ["lora", "loha", "lokr"]
    with tempfile.TemporaryDirectory() as folder:
        paths = [Path(folder) / f"adapter{i}.safetensors" for i in range(args.adapters)]
        for i, path in enumerate(paths):
            random_adapter(base, kinds[i % len(kinds)], path, seed=i)
        patcher = WeightPatcher(base.trainable_components(), base.architecture.kohya_table)
        files = [patcher.read(path) for path in paths]
        switches = []
        for _ in range(args.repeats):
            for file in files:
                started = time.perf_counter()
                patcher.apply([(file, 1.0)])
                switches.append(time.perf_counter() - started)
    load, switch = statistics.median(loads), statistics.median(switches)
    modules = len(files[0].tensors)
    print(
        f"base {args.base}: {sum(p.numel() for p in base.denoiser.parameters()):,} UNet parameters, "
        f"{modules} adapted modules per adapter ({', '.join(kinds)})"
    )
    print(f"pipeline load (reload per adapter): {load * 1000:8.1f} ms (median of {args.repeats})")
    print(f"adapter switch (weight patching):   {switch * 1000:8.1f} ms (median of {len(switches)})")
    print(f"switch / load: {100 * switch / load:.2f}% (target <= 1%)")


if __name__ == "__main__":
    main()
