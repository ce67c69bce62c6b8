"""A quantized frozen base on a DiT of a few hundred million parameters: weight memory, learning, step time.

Builds a Flux-shaped pipeline with random weights (a 4 double + 8 single block transformer, 1024 wide, ~280M
parameters; tiny VAE and text encoders), then for `none` (bf16 storage), `fp8`, `int8` and `nf4`:
- the denoiser's weight memory (parameters and buffers as stored);
- a LoRA (rank 16, every Linear) trained by lora-cli's own session for `--steps` steps on one fixed image:
  the loss on fixed noise before and after, and the CPU time per step (one thread).

Run: `python benchmarks/quantized_base.py [--steps 20]`
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def build(folder: Path) -> Path:
    from lora_cli.toy.tiny_dits import build_tiny_flux

    return build_tiny_flux(folder, heads=16, head_dim=64, blocks=(4, 8))


def measure(base: Path, data: Path, quantize: str, steps: int, work: Path) -> dict[str, float]:
    import torch

    from lora_cli.config import validate_preset
    from lora_cli.training.loop import micro_batch_loss, optimizer_step
    from lora_cli.training.session import BatchSample, build_session, prepare_model, run_paths, scan_dataset

    raw = {
        "model": {"path": str(base), "dtype": "bfloat16", "quantize": quantize, "max_text_tokens": 16},
        "data": {"folder": str(data), "resolution": 64},
        "adapter": {"rank": 16, "alpha": 16, "targets": "full"},
        "train": {"steps": steps, "learning_rate": 2e-3, "batch_size": 1, "mixed_precision": "bf16"},
        "output": {"dir": str(work / quantize)},
    }
    preset = validate_preset(raw, quantize)
    base_model, adapter, training_data = prepare_model(preset, scan_dataset(preset))
    weights = sum(
        t.numel() * t.element_size() for t in [*base_model.denoiser.parameters(), *base_model.denoiser.buffers()]
    )
    session = build_session(preset, run_paths(preset), base_model, adapter, training_data)

    def fixed_loss() -> float:
        with torch.no_grad():
            return sum(micro_batch_loss(session, [BatchSample(0, 1000 + s)]).item() for s in range(4)) / 4

    before = fixed_loss()
    started = time.process_time()
    while session.step < session.total_steps:
        optimizer_step(session)
    per_step = (time.process_time() - started) / steps
    parameters = sum(p.numel() for p in base_model.denoiser.parameters())
    return {"weights_mib": weights / 2**20, "before": before, "after": fixed_loss(), "cpu_s_per_step": per_step,
            "parameters": parameters}  # fmt: skip


def main() -> None:
    from lora_cli.toy.shapes import write_dataset

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        work = Path(root)
        base = build(work / "flux-280m")
        data = work / "data"
        write_dataset(data, [("yellow", "star")], per_pair=1, size=64, seed=1)
        for copy in range(4):  # five copies of one image: every step sees the same picture
            for suffix in (".png", ".txt"):
                source = next(data.glob(f"*{suffix}"))
                shutil.copy(source, data / f"copy{copy}{suffix}")
        results = {mode: measure(base, data, mode, args.steps, work) for mode in ("none", "fp8", "int8", "nf4")}
    reference = results["none"]["weights_mib"]
    print(f"Flux-shaped DiT, {results['none']['parameters'] / 1e6:.0f}M parameters as loaded; LoRA rank 16 on every "
          f"Linear, {args.steps} steps on one 64 px image, one thread")  # fmt: skip
    print(f"{'base':>6} {'weights MiB':>12} {'vs bf16':>8} {'loss before':>12} {'after':>8} {'CPU s/step':>11}")
    for mode, r in results.items():
        print(f"{mode:>6} {r['weights_mib']:12.1f} {r['weights_mib'] / reference:8.2f} {r['before']:12.4f} "
              f"{r['after']:8.4f} {r['cpu_s_per_step']:11.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
