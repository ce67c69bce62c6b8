"""The GPU check of fp8 bases and block offloading: FLUX.1-dev's shapes at the memory budgets the planner answers
for, each run's measured GPU peak beside its `--plan` estimate, and the slowdown per offloaded block.

    python -m benchmarks.offload_gpu [--deadline 450] [--steps 12] [--work DIR] [--json ROWS.json] [--small]

It builds a FLUX.1-dev-shaped diffusers folder where it runs: the transformer (11.9B parameters) with random
bfloat16 weights made on the GPU (24 GB of disk), the VAE, CLIP-L and T5-XXL with their real
safetensors headers over zero-filled sparse files (`benchmarks.shaped_headers`: their memory is real, their
outputs are zeros) and toy tokenizers, and 16 images of 512 px. Then `presets/flux-nf4.yaml` (rank 16 attention
LoRA, batch 1, bf16, AdamW8bit, checkpointing, caches on) trains at 512 px in fresh processes:
  the planner's advice for `--vram 8GiB` (nf4 and offloaded blocks), fp8 with the fewest offloaded blocks the
  planner fits in 12 GiB, bf16 with the fewest it fits in 16 GiB, each followed by the same quantization with
  every block resident (the baseline for the slowdown per block).
Each row: s/step (median optimizer-step interval after the first quarter, `benchmarks.step_timer`), GPU peak by
nvidia-smi (every 50 ms, CUDA context included, as the planner counts it) and torch's allocator peak beside the
plan's GPU peak, the process's peak RSS (its own rusage) beside the plan's resident peak (file pages of the weights
read once included), and its peak anonymous and shared memory (RssAnon + RssShmem, sampled; CUDA's pinned memory may
be either) beside the plan's RAM peak (what must fit: offloaded blocks and streamed text encoders wait in pinned
host memory). Runs that would pass `--deadline` seconds are skipped. `--small` is a CPU dry run of the same script
with a tiny Flux-shaped folder, budgets just under each resident plan and no nf4 (bitsandbytes' 4-bit kernels need
CUDA): it checks the script, not the numbers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from benchmarks.gpu_speed import Case, Column, environment, print_table, run_case, speed, work_folder
from benchmarks.peer_compare import PROMPT, TRAIN
from benchmarks.shaped_headers import FLUX_OTHERS, flux_dev_modules, write_pipeline, write_random_weights

if TYPE_CHECKING:
    from lora_cli.planning import MemoryPlan

ROOT = Path(__file__).parents[1]
PRESET = ROOT / "presets" / "flux-nf4.yaml"
GiB = 2**30
PRECISION = {"none": "bf16", "fp8": "fp8", "nf4": "nf4"}  # model.quantize -> the weights' format


@dataclass(frozen=True)
class Setting:
    """One run: its label, and the quantization and budget the planner chooses its offloaded blocks for (the
    planner's whole advice when `quantize` is None)."""

    label: str
    quantize: str | None
    vram_gib: float | None  # None: every block resident


SETTINGS = (  # each offloaded run, then the resident run its slowdown per block is measured against
    Setting("8 GiB: the planner's advice", None, 8),
    Setting("nf4, resident", "nf4", None),
    Setting("12 GiB: fp8, fewest offloaded blocks that fit", "fp8", 12),
    Setting("fp8, resident", "fp8", None),
    Setting("16 GiB: bf16, fewest offloaded blocks that fit", "none", 16),
    Setting("bf16, resident", "none", None),
)


def small_flux_modules() -> dict[str, torch.nn.Module]:
    """FLUX.1-dev's components shrunk for a CPU dry run: 64-wide transformer (2 double, 4 single blocks)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(
            num_layers=2, num_single_layers=4, attention_head_dim=16, num_attention_heads=4,
            joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
        )  # fmt: skip
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(16, 32, 32, 32), layers_per_block=1, latent_channels=16, norm_num_groups=8,
            scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
        )  # fmt: skip
        clip_config = CLIPTextConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
            max_position_embeddings=77, projection_dim=32,
        )  # fmt: skip
        t5_config = T5Config(
            d_model=64, d_kv=16, d_ff=128, num_layers=3, num_heads=4, vocab_size=32128,
            feed_forward_proj="gated-gelu", is_gated_act=True,
        )  # fmt: skip
        clip, t5 = CLIPTextModel(clip_config), T5EncoderModel(t5_config)
    return {"transformer": transformer, "vae": vae, "text_encoder": clip, "text_encoder_2": t5}


def build_flux(folder: Path, small: bool) -> Path:
    """A trainable FLUX.1-dev-shaped folder (see the module's docstring); the transformer's weights are random."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from lora_cli.toy.tiny_dits import t5_tokenizer
    from lora_cli.toy.tiny_pipeline import VOCAB_WORDS, write_clip_tokenizer

    if (folder / "model_index.json").exists():
        return folder
    modules = small_flux_modules() if small else flux_dev_modules()
    staging = folder.with_name(folder.name + ".partial")
    write_pipeline(staging, "FluxPipeline", modules, FLUX_OTHERS)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shards = "200KB" if small else "10GB"  # several shards either way, as FLUX.1-dev's transformer comes
    write_random_weights(modules["transformer"], staging / "transformer", device, max_shard_size=shards)
    write_clip_tokenizer(staging / "tokenizer", VOCAB_WORDS, 77)
    t5_tokenizer().save_pretrained(staging / "tokenizer_2")
    FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    ).save_pretrained(staging / "scheduler")  # fmt: skip
    staging.rename(folder)
    return folder


def build_data(folder: Path, size: int) -> Path:
    from lora_cli.toy.shapes import write_dataset

    if not folder.exists():
        write_dataset(folder, [("red", "circle"), ("blue", "square")], per_pair=8, size=size, seed=0)
        for caption in folder.glob("*.txt"):
            caption.write_text(PROMPT)
    return folder


def plan_of(overrides: list[str]) -> MemoryPlan:
    """The planner's GPU plan for the preset with `overrides`."""
    from lora_cli.config import load_preset
    from lora_cli.planning import PlanSettings, estimate_memory, read_inventory

    preset = load_preset(PRESET, overrides)
    return estimate_memory(read_inventory(preset.model), PlanSettings.from_preset(preset), "cuda")


def advised(overrides: list[str], vram: int) -> list[str] | None:
    """The planner's advice for `vram` as --set overrides; None when it cannot fit."""
    from lora_cli.config import load_preset
    from lora_cli.planning import Budget, PlanSettings, advise, read_inventory

    preset = load_preset(PRESET, overrides)
    advice = advise(read_inventory(preset.model), PlanSettings.from_preset(preset), Budget(vram=vram))
    if not advice.fits:
        return None
    return [f"{key}={value}" for change in advice.changes for key, value in change.updates.items()]


def fewest_blocks(overrides: list[str], vram: int) -> list[str] | None:
    """`train.offload_blocks=N` for the smallest N the planner fits in `vram`; None when no N does."""
    for count in range(plan_of(overrides).offloadable_blocks + 1):
        chosen = [*overrides, f"train.offload_blocks={count}"]
        if plan_of(chosen).peak_device_bytes <= vram:
            return chosen[len(overrides) :]
    return None


def setting_overrides(setting: Setting, common: list[str], small: bool) -> list[str] | None:
    """The --set overrides of `setting`'s run (None when the planner cannot fit its budget). In a dry run the
    budget is just under the resident plan, so that some blocks are offloaded."""
    fixed = [] if setting.quantize is None else [f"model.quantize={setting.quantize}"]
    if setting.vram_gib is None:
        return fixed
    vram = round(setting.vram_gib * GiB)
    if small:
        vram = plan_of([*common, *(fixed or ["model.quantize=fp8"])]).peak_device_bytes - 1
    if setting.quantize is None:
        advice = advised([*common, "model.quantize=none"], vram)
        return None if advice is None else ["model.quantize=none", *advice]
    chosen = fewest_blocks([*common, *fixed], vram)
    return None if chosen is None else [*fixed, *chosen]


def slowdowns(rows: list[dict[str, object]]) -> list[str]:
    """Seconds per offloaded block per step: each offloaded run against the resident run of its quantization."""
    resident = {row["quantize"]: row for row in rows if not row.get("offload_blocks") and "s_per_step" in row}
    lines = []
    for row in rows:
        base = resident.get(row["quantize"])
        blocks = row.get("offload_blocks")
        if blocks and base and row.get("s_per_step") and base.get("s_per_step"):
            per_block = (row["s_per_step"] - base["s_per_step"]) / blocks
            lines.append(
                f"{PRECISION[str(row['quantize'])]}: {blocks} blocks offloaded {row['s_per_step']} s/step vs resident "
                f"{base['s_per_step']}: {per_block * 1000:+.1f} ms per offloaded block per step"
            )
    return lines


def versus(measured_key: str, plan_key: str) -> Callable[[dict[str, object]], str]:
    """A cell showing measured/plan - 1 of two fields of a row."""

    def cell(row: dict[str, object]) -> str:
        measured, plan = row.get(measured_key), row.get(plan_key)
        return f"{measured / plan - 1:+.1%}" if measured and plan else ""

    return cell


COLUMNS: tuple[Column, ...] = (
    ("run", lambda row: row["run"]),
    ("settings", lambda row: row.get("settings", "")),
    ("s/step", speed),
    ("GPU peak, nvidia-smi (MiB)", lambda row: row.get("gpu_peak_mib") or ""),
    ("allocator peak (MiB)", lambda row: row.get("allocator_peak_mib", "")),
    ("--plan (MiB)", lambda row: row.get("plan_mib", "")),
    ("GPU vs plan", versus("gpu_peak_mib", "plan_mib")),
    ("RSS peak (MiB)", lambda row: row.get("ram_peak_mib", "")),
    ("RSS plan (MiB)", lambda row: row.get("plan_rss_mib", "")),
    ("RSS vs plan", versus("ram_peak_mib", "plan_rss_mib")),
    ("RssAnon+RssShmem peak (MiB)", lambda row: row.get("anonymous_peak_mib", "")),
    ("RAM plan (MiB)", lambda row: row.get("plan_ram_mib", "")),
    ("vs RAM plan", versus("anonymous_peak_mib", "plan_ram_mib")),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deadline", type=float, default=450, help="seconds for everything, the build included")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    parser.add_argument("--work", type=Path, help="where the model and runs go (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--small", action="store_true", help="CPU dry run with a tiny Flux-shaped folder")
    args = parser.parse_args()
    began = time.perf_counter()
    with work_folder(args.work) as work:
        model = work / ("flux-small" if args.small else "flux-dev")
        # in a child process, so that no CUDA memory of this one counts in the runs' nvidia-smi peaks
        build = f"from benchmarks.offload_gpu import build_flux; build_flux(Path({str(model)!r}), {args.small})"
        subprocess.run([sys.executable, "-c", f"from pathlib import Path; {build}"], cwd=ROOT, check=True)
        resolution = 64 if args.small else 512
        data = build_data(work / f"data{resolution}", resolution)
        print(f"model and data ready in {time.perf_counter() - began:.0f} s", flush=True)
        common = [f"model.path={model}", f"data.folder={data}", f"data.resolution={resolution}",
                  f"train.steps={args.steps}", "train.warmup_steps=1", "output.save_every=100000"]  # fmt: skip
        if args.small:
            common.append("train.optimizer=adamw")  # bitsandbytes' 8-bit AdamW wants CUDA too
        rows: list[dict[str, object]] = []
        for number, setting in enumerate(SETTINGS):
            row: dict[str, object] = {"run": setting.label}
            overrides = setting_overrides(setting, common, args.small)
            if args.small and overrides and "model.quantize=nf4" in overrides:
                continue  # bitsandbytes' 4-bit kernels need CUDA
            left = args.deadline - (time.perf_counter() - began)
            if overrides is None:
                row["skipped"] = "the planner finds no setting that fits"
            elif left < (30 if args.small else 100):  # a FLUX.1-dev run loads 24 GB before its first step
                row["skipped"] = "skipped (deadline)"
            else:
                run = [*common, *overrides, f"output.dir={work / f'run-{number}'}"]
                command = ["-c", TRAIN, str(PRESET), "--no-progress", "--overwrite"]
                command += [flag for override in run for flag in ("--set", override)]
                row.update(run_case(Case(setting.label, command, timeout=240), work, left))
                plan = plan_of(run)
                row["plan_mib"] = round(plan.peak_device_bytes / 2**20)
                row["plan_ram_mib"] = round(plan.peak_ram_bytes / 2**20)
                row["plan_rss_mib"] = round(plan.peak_resident_bytes / 2**20)
            settings = dict(item.split("=", 1) for item in overrides or [])
            row["settings"] = ", ".join(f"{key}: {value}" for key, value in settings.items()) or "as the preset"
            row["quantize"] = settings.get("model.quantize", "nf4")
            row["offload_blocks"] = int(settings.get("train.offload_blocks", 0))
            rows.append(row)
            print(json.dumps(row), flush=True)
        print_table(rows, environment, COLUMNS)
        print("\n".join(slowdowns(rows)))
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
