"""How close `lora-train --plan`'s CPU estimate comes to the measured peak RSS of real training runs.

Each case trains a few steps with `lora-train` in a fresh subprocess (OMP_NUM_THREADS=1) and takes that child's
`ru_maxrss` from `os.wait4`; the estimate is the planner's resident peak for device "cpu" on the same preset (its
RAM peak plus the file pages of weights read once, which RSS counts too). Models: the tiny toy pipeline, the shipped
`builtin:shapes` base, a mid-size SD1.5-layout pipeline (UNet channels 160/320/640/640, CLIP-L-width text encoder,
SD VAE; about 1.4 GB), also as one single-file checkpoint, a mid-size Flux-layout DiT (512 wide, 2 double and 4
single blocks, 256-wide T5; about 170 MB), a mid-size Wan-layout video DiT (512 wide, 4 blocks, Wan 2.1's VAE layout
at width 32) on 9-frame clips, and, with `--full-size`, random weights in SD1.5's shapes (about 4 GB).

Run: `python benchmarks/plan_accuracy.py [--full-size] [--models DIR] [--json numbers.json]`
(about 8 minutes; 15 more with --full-size).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

TRAIN = "from lora_cli.cli.train import main; main()"
MiB = 2**20
IMAGES = 6


@dataclass(frozen=True)
class Case:
    label: str
    model: str  # tiny | shapes | mid | mid-single | mid-flux | mid-wan | sd15
    resolution: int
    sections: dict
    config_from: str | None = None  # for a single file: the model folder that holds the component configs


@dataclass
class Row:
    label: str
    estimate_mib: float
    measured_mib: float

    @property
    def error(self) -> float:
        return self.estimate_mib / self.measured_mib - 1


FP8_BATCH_1 = {"model": {"quantize": "fp8"}, "train": {"batch_size": 1}}
CASES = [
    Case("tiny, 64 px, batch 2", "tiny", 64, {}),
    Case(
        "tiny, 256 px, batch 4, locon full r16",
        "tiny",
        256,
        {"adapter": {"type": "locon", "rank": 16}, "train": {"batch_size": 4}},
    ),
    Case("builtin:shapes, 64 px, batch 2", "shapes", 64, {}),
    Case("mid, 512 px, batch 1", "mid", 512, {"train": {"batch_size": 1}}),
    Case("mid, 512 px, batch 2, checkpointing", "mid", 512, {"train": {"gradient_checkpointing": True}}),
    Case(
        "mid, 512 px, batch 1, bfloat16 weights",
        "mid",
        512,
        {"model": {"dtype": "bfloat16"}, "train": {"batch_size": 1}},
    ),
    Case("mid as one .safetensors file, 256 px", "mid-single", 256, {}, config_from="mid"),
    Case(
        "mid, 256 px, batch 4, rank 64, cached",
        "mid",
        256,
        {"adapter": {"rank": 64}, "train": {"batch_size": 4}, "cache": {"latents": True, "text_embeddings": True}},
    ),
    Case("mid Flux, 256 px, batch 2, 64 T5 tokens", "mid-flux", 256, {"model": {"max_text_tokens": 64}}),
    Case("mid Flux, 512 px, batch 1, 512 T5 tokens", "mid-flux", 512, {"train": {"batch_size": 1}}),
    Case(
        "mid Flux, 512 px, batch 1, checkpointing",
        "mid-flux",
        512,
        {"train": {"batch_size": 1, "gradient_checkpointing": True}},
    ),
    Case("mid Wan, 256 px, 9 frames, batch 1", "mid-wan", 256, {"data": {"frames": 9}, "train": {"batch_size": 1}}),
    Case("mid, 512 px, batch 1, fp8 base", "mid", 512, FP8_BATCH_1),
    Case("mid Flux, 512 px, batch 1, fp8 base", "mid-flux", 512, FP8_BATCH_1),
]
FULL_SIZE_CASES = [
    Case("SD1.5 shapes, 512 px, batch 1", "sd15", 512, {"train": {"batch_size": 1}}),
    Case("SD1.5 shapes, 512 px, batch 2, checkpointing", "sd15", 512, {"train": {"gradient_checkpointing": True}}),
    Case(
        "SD1.5 shapes, 256 px, batch 2, cached",
        "sd15",
        256,
        {"cache": {"latents": True, "text_embeddings": True}},
    ),
]


def build_mid_sd(folder: Path) -> Path:
    """An SD1.5-layout pipeline at half the UNet width (about 215M UNet parameters)."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTokenizer

    from lora_cli.toy.tiny_pipeline import (
        VOCAB_WORDS,
        clip_text_encoder,
        eight_x_vae,
        save_sd_pipeline,
        write_clip_tokenizer,
    )

    write_clip_tokenizer(folder / "tokenizer", VOCAB_WORDS, 77)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, block_out_channels=(160, 320, 640, 640), cross_attention_dim=768)
    vae = eight_x_vae((128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=512)
    text_encoder = clip_text_encoder(tokenizer, hidden_size=768, layers=12, heads=12, max_length=77)
    return save_sd_pipeline(folder, vae, text_encoder, tokenizer, unet)


def build_mid_flux(folder: Path) -> Path:
    """A Flux-layout pipeline 512 wide (8 heads of 64), 2 double and 4 single blocks, CLIP and T5 encoders."""
    from lora_cli.toy.tiny_dits import build_tiny_flux

    return build_tiny_flux(folder, heads=8, head_dim=64, blocks=(2, 4), text_widths=(64, 256), vae_width=32)


def build_mid_wan(folder: Path) -> Path:
    """A Wan-layout text-to-video pipeline 512 wide (8 heads of 64), 4 blocks, UMT5 text, and a causal video VAE in
    Wan 2.1's layout (two ResNets per level, widths 32/64/128/128)."""
    from lora_cli.toy.tiny_dits import build_tiny_wan

    return build_tiny_wan(
        folder, heads=8, head_dim=64, blocks=4, ffn_dim=2048, text_width=256, rope_length=1024, vae_width=32,
        vae_mult=(1, 2, 4, 4), vae_resnets=2,
    )  # fmt: skip


def build_models(root: Path, full_size: bool) -> dict[str, str]:
    from lora_cli.toy.tiny_pipeline import build_sd15_shaped, build_tiny_sd

    builders = {"tiny": build_tiny_sd, "mid": build_mid_sd, "mid-flux": build_mid_flux, "mid-wan": build_mid_wan}
    if full_size:
        builders["sd15"] = build_sd15_shaped
    paths = {"shapes": "builtin:shapes"}
    for name, build in builders.items():
        folder = root / name
        if not (folder / "model_index.json").is_file():
            build(folder)
        paths[name] = str(folder)
    single = root / "mid.safetensors"
    if not single.is_file():
        from lora_cli.models.single_file_writer import write_single_file

        write_single_file(root / "mid", single, {})
    paths["mid-single"] = str(single)
    return paths


def preset_for(case: Case, models: dict[str, str], data: Path, output: Path) -> dict:
    preset = {
        "model": {"path": models[case.model], "config": models[case.config_from] if case.config_from else None},
        "data": {"folder": str(data), "resolution": case.resolution},
        "adapter": {"rank": 4},
        "train": {"steps": 2, "batch_size": 2, "learning_rate": 1.0e-4},
        "output": {"dir": str(output)},
    }
    for section, values in case.sections.items():
        preset.setdefault(section, {}).update(values)
    return preset


def estimate_mib(preset: dict) -> float:
    from lora_cli.config import validate_preset
    from lora_cli.planning import plan_preset

    plan = plan_preset(validate_preset(preset, "benchmark"), device="cpu", images=IMAGES)
    return plan.peak_resident_bytes / MiB  # peak RSS counts the file pages quantizing reads


def measure_mib(preset: dict, folder: Path) -> float:
    """Peak RSS of `lora-train` on the preset, from the child's own rusage."""
    path = folder / "preset.yaml"
    path.write_text(yaml.safe_dump(preset))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    log = folder / "train.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-c", TRAIN, str(path), "--no-progress"], env=env, stdout=sink, stderr=sink
        )
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"lora-train failed for {path}:\n{log.read_text()[-3000:]}")
    return usage.ru_maxrss * 1024 / MiB


def run_cases(cases: list[Case], models: dict[str, str], root: Path) -> list[Row]:
    from lora_cli.toy.shapes import write_dataset
    from lora_cli.toy.tiny_dits import write_clips

    rows = []
    for index, case in enumerate(cases):
        frames = case.sections.get("data", {}).get("frames")
        data = root / (f"clips-{case.resolution}-{frames}" if frames else f"data-{case.resolution}")
        if frames and not data.is_dir():
            write_clips(data, IMAGES, frames, size=case.resolution)
        elif not data.is_dir():
            write_dataset(
                data, [("yellow", "star"), ("red", "circle")], per_pair=IMAGES // 2, size=case.resolution, seed=0
            )
        folder = root / f"case-{index}"
        folder.mkdir(exist_ok=True)
        preset = preset_for(case, models, data, folder / "run")
        row = Row(case.label, estimate_mib(preset), measure_mib(preset, folder))
        print(f"{row.label:<48}{row.estimate_mib:>12.0f}{row.measured_mib:>12.0f}{row.error:>+9.1%}", flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full-size", action="store_true", help="also measure SD1.5-sized weights (~4 GB)")
    parser.add_argument("--models", type=Path, help="keep built models in this folder (reused next time)")
    parser.add_argument("--only", metavar="TEXT", default="", help="run only the cases whose label holds TEXT")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers to this JSON file")
    args = parser.parse_args()

    cases = [case for case in CASES + (FULL_SIZE_CASES if args.full_size else []) if args.only in case.label]
    with tempfile.TemporaryDirectory(prefix="lora-plan-") as tmp:
        root = Path(tmp)
        models = build_models(args.models or root / "models", args.full_size)
        print(f"{'case':<48}{'estimate MiB':>12}{'RSS MiB':>12}{'error':>9}")
        rows = run_cases(cases, models, root)
    worst = max(abs(row.error) for row in rows)
    print(f"largest error {worst:.1%} (target: within 25%)")
    if args.json:
        numbers = [{**asdict(row), "error": row.error} for row in rows]
        args.json.write_text(json.dumps(numbers, indent=2) + "\n")


if __name__ == "__main__":
    main()
