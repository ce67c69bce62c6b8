"""Switching adapters on one loaded base vs. reloading the pipeline for each adapter.

Loads `builtin:shapes` (or `--base`), writes `--adapters` random rank-8 adapters, then times, on one thread:
- a pipeline load (`load_base` + building the pipeline), the cost of reloading per adapter;
- one switch between LoRA adapters with lora-sample's bypass switcher (all injected once, beside the
  frozen weights; a switch only changes which adapter each layer runs);
- one switch with the weight patcher lora-sample uses for a mix of algorithms (LoRA, LoHa, LoKr in turn:
  restore the touched weights, add the next adapter's delta).
Target: a switch costs <= 1% of a pipeline load.

`--sd15` builds a random-weights pipeline of SD1.5's shapes (860M-parameter UNet, CLIP-L-sized text
encoder, SD VAE) to measure at the size users load; `--targets attention` adapts only the attention
projections (the common LoRA), `full` every Linear and Conv2d.

Run: `python benchmarks/adapter_swap.py [--adapters 6] [--repeats 5] [--base builtin:shapes | --sd15] [--targets full]`
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


def random_adapter(base, kind: str, path: Path, seed: int, targets: str, rank: int = 8) -> None:
    """A trained-looking adapter: peft layers injected with random weights, saved like lora-train does."""
    import torch

    from lora_cli.adapters.files import write_adapter
    from lora_cli.adapters.injection import inject_spec
    from lora_cli.adapters.registry import AdapterSpec
    from lora_cli.adapters.targets import resolve_targets

    unet = type(base.denoiser).from_config(base.denoiser.config)  # a scratch copy; the base stays clean
    patterns = base.architecture.target_presets[targets]
    targets_by_component = {"unet": resolve_targets(unet, patterns, "benchmark")}
    adapter = inject_spec({"unet": unet}, AdapterSpec(kind, rank, rank / 2), targets_by_component, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    for param in adapter.parameters("unet"):
        param.data = 0.01 * torch.randn(param.shape, generator=generator)
    write_adapter(path, adapter.tensors(), adapter.ranks(), adapter.algorithm, "kohya", base.architecture, {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="builtin:shapes")
    parser.add_argument("--adapters", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sd15", action="store_true", help="measure on a random SD1.5-shaped pipeline")
    parser.add_argument("--targets", choices=["attention", "full"], default="full")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from lora_cli.sampling.patcher import WeightPatcher
    from lora_cli.sampling.switcher import BypassSwitcher
    from lora_cli.toy.tiny_pipeline import build_sd15_shaped

    torch.set_num_threads(1)
    scratch = tempfile.TemporaryDirectory()
    if args.sd15:
        args.base = str(build_sd15_shaped(Path(scratch.name) / "sd15-shaped"))
    load_pipeline(args.base)  # warm imports and file caches, as a long-running sampler would be
    loads = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        base, _ = load_pipeline(args.base)
        loads.append(time.perf_counter() - started)
    mixed = ["lora", "loha", "lokr"]
    with tempfile.TemporaryDirectory() as folder:
        loras = [Path(folder) / f"lora{i}.safetensors" for i in range(args.adapters)]
        others = [Path(folder) / f"mixed{i}.safetensors" for i in range(args.adapters)]
        for i, (lora, other) in enumerate(zip(loras, others, strict=True)):
            random_adapter(base, "lora", lora, seed=i, targets=args.targets)
            random_adapter(base, mixed[i % len(mixed)], other, seed=100 + i, targets=args.targets)
        bypass = switch_times(base, BypassSwitcher(base.trainable_components()), loras, args.repeats)
        base, _ = load_pipeline(args.base)
        patching = switch_times(base, WeightPatcher(base.trainable_components()), others, args.repeats)
    load = statistics.median(loads)
    print(
        f"base {args.base}: {sum(p.numel() for p in base.denoiser.parameters()):,} UNet parameters, "
        f"{args.targets} targets, rank 8"
    )
    print(f"pipeline load (reload per adapter):       {load * 1000:9.2f} ms (median of {args.repeats})")
    for label, switch in (("bypass switch, LoRA", bypass), ("weight patching, mixed", patching)):
        print(f"{label + ':':41} {switch * 1000:9.2f} ms = {100 * switch / load:.2f}% of a load (target <= 1%)")
    scratch.cleanup()


def switch_times(base, switcher, paths: list[Path], repeats: int) -> float:
    """Median seconds to make each adapter the active one, cycling through all of them."""
    from lora_cli.adapters.catalog import ModuleCatalog
    from lora_cli.adapters.files import read_adapter

    catalog = ModuleCatalog.from_components(base.architecture, base.trainable_components())
    files = [read_adapter(path, catalog) for path in paths]
    for file in files:
        switcher.add(file)
    times = []
    for _ in range(repeats):
        for file in files:
            started = time.perf_counter()
            switcher.apply([(file, 1.0)])
            times.append(time.perf_counter() - started)
    return statistics.median(times)


if __name__ == "__main__":
    main()
