"""Shared fixtures: a tiny SD pipeline and a small dataset, built once per session and loaded from disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lora_cli.toy.tiny_pipeline import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd", seed=0)


TINY_BUILDERS = {
    "sdxl": "lora_cli.toy.tiny_pipeline:build_tiny_sdxl",
    "flux": "lora_cli.toy.tiny_dits:build_tiny_flux",
    "sd3": "lora_cli.toy.tiny_dits:build_tiny_sd3",
    "pixart": "lora_cli.toy.tiny_dits:build_tiny_pixart",
    "wan": "lora_cli.toy.tiny_dits:build_tiny_wan",
    "z-image": "lora_cli.toy.tiny_llm_dits:build_tiny_z_image",
    "qwen-image": "lora_cli.toy.tiny_llm_dits:build_tiny_qwen_image",
    "flux2": "lora_cli.toy.tiny_llm_dits:build_tiny_flux2_klein",
    "hunyuan-video": "lora_cli.toy.tiny_llm_dits:build_tiny_hunyuan_video",
    "longcat-image": "lora_cli.toy.tiny_llm_dits:build_tiny_longcat_image",
}


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory, tiny_sd: Path):
    """`tiny_base(name)`: the tiny random-init pipeline of an architecture (`sd` is `tiny_sd`), built once per
    session on first use and loaded from disk like a user's folder."""
    from importlib import import_module

    folder, built = tmp_path_factory.mktemp("models"), {"sd": tiny_sd}

    def build(name: str) -> Path:
        if name not in built:
            module, function = TINY_BUILDERS[name].split(":")
            built[name] = getattr(import_module(module), function)(folder / f"tiny-{name}", seed=0)
        return built[name]

    return build


@pytest.fixture(scope="session")
def tiny_sdxl(tiny_base) -> Path:
    return tiny_base("sdxl")


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lora_cli.toy.shapes import write_dataset

    folder = tmp_path_factory.mktemp("data") / "stars"
    write_dataset(folder, [("yellow", "star"), ("red", "circle")], per_pair=3, size=64, seed=1)
    return folder


@pytest.fixture(scope="session")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six captioned 9-frame clips of moving shapes (video files), for video bases."""
    from lora_cli.toy.tiny_dits import write_clips

    return write_clips(tmp_path_factory.mktemp("data") / "clips", count=6, frames=9)


@pytest.fixture
def write_preset(tmp_path: Path, tiny_sd: Path, shapes_data: Path):
    """Write a preset for the tiny model; `sections` are deep-merged over a small working default."""

    def write(name: str = "preset.yaml", **sections: dict) -> Path:
        preset = {
            "model": {"path": str(tiny_sd)},
            "data": {"folder": str(shapes_data), "resolution": 64},
            "adapter": {"rank": 4, "alpha": 8},
            "train": {"steps": 4, "learning_rate": "1e-3", "batch_size": 2},
            "output": {"dir": str(tmp_path / "run")},
        }
        for section, values in sections.items():
            preset.setdefault(section, {}).update(values)
        path = tmp_path / name
        path.write_text(yaml.safe_dump(preset))
        return path

    return write


def run_command(module: str, *args: str, entry: str = "main") -> subprocess.CompletedProcess:
    """Run a lora-cli command exactly as a user does: a fresh process calling its console entry point."""
    command = [sys.executable, "-c", f"from lora_cli.cli.{module} import {entry}; {entry}()", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def invoke(module: str, *args: str, entry: str = "main") -> subprocess.CompletedProcess:
    """Run a lora-cli command in this process (no interpreter start-up, so cheap enough for large test grids):
    its exit code, stdout and stderr, exactly as `main()` produces them. An exception that escapes `main()`
    (a traceback for the user) propagates and fails the test."""
    import contextlib
    import importlib
    import io

    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    argv = sys.argv
    sys.argv = [f"lora-{module}", *args]
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            getattr(importlib.import_module(f"lora_cli.cli.{module}"), entry)()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """`lora-train ARGS`."""
    return run_command("train", *args)


def train_preset(raw: dict, name: str) -> Path:
    """Train the preset given as a dict (as a YAML file would hold it) through lora-cli's trainer."""
    from rich.console import Console

    from lora_cli.config import validate_preset
    from lora_cli.training.run import train

    return train(validate_preset(raw, name), Console(quiet=True), show_progress=False)


def fixed_batch_losses(
    preset: Path, overrides: list[str], shapes_data: Path, steps: int = 60, sample: str = "yellow_star_0000"
) -> tuple[float, float]:
    """Mean loss on one fixed sample with fixed noise before and after `steps` optimizer steps on it (the
    dataset is 5 copies of one image or clip `sample` of `shapes_data`, batch 1), through the trainer's own
    session and loop."""
    import shutil

    import torch

    from lora_cli.config import load_preset
    from lora_cli.training.loop import micro_batch_loss, optimizer_step
    from lora_cli.training.session import BatchSample, build_session, prepare_model, run_paths, scan_dataset

    single = preset.parent / "single-image"
    single.mkdir()
    for copy in range(5):  # the dataset floor is 5 images; identical copies keep every batch the same
        for source in shapes_data.glob(f"{sample}*"):
            target = single / f"one{copy}{source.suffix}"
            shutil.copytree(source, target) if source.is_dir() else shutil.copy(source, target)
    settings = [f"data.folder={single}", "train.batch_size=1", f"train.steps={steps}", *overrides]
    loaded = load_preset(preset, settings)
    session = build_session(loaded, run_paths(loaded), *prepare_model(loaded, scan_dataset(loaded)))

    def fixed_loss() -> float:
        with torch.no_grad():
            losses = [micro_batch_loss(session, [BatchSample(0, 1000 + seed)]).item() for seed in range(8)]
        return sum(losses) / len(losses)

    before = fixed_loss()
    while session.step < session.total_steps:
        optimizer_step(session)
    return before, fixed_loss()


def read_for_base(adapter: Path, base: Path | str):
    """An adapter file read against a base as every lora-cli command reads it."""
    from lora_cli.adapters.catalog import ModuleCatalog
    from lora_cli.adapters.files import read_adapter
    from lora_cli.models.weights import open_base_weights

    with open_base_weights(str(base), "base") as weights:
        return read_adapter(adapter, ModuleCatalog.from_weights(weights))


def base_weights(base: Path | str):
    """The stored tensors of a (non-pickle) base, as the toolbox commands see them."""
    from lora_cli.models.weights import open_base_weights

    with open_base_weights(str(base), "base") as weights:
        return weights


def diffusers_image(
    model: Path,
    adapter: Path | None,
    prompt: str,
    seed: int,
    text_tokens: int | None = None,
    steps: int | None = 3,
    guidance_scale: float | None = 7.5,
    scheduler: str | None = None,
):
    """What diffusers itself draws (its own pipeline and `load_lora_weights`): an int16 RGB array, 64 px, by
    default 3 steps and guidance 7.5 (the settings the tests give lora-sample); None takes the pipeline's
    default. `text_tokens` is the T5 sequence length for pipelines that take one; `scheduler` a diffusers
    scheduler class made from the pipeline's scheduler config (default: the pipeline's own)."""
    from inspect import signature

    import diffusers
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    sd15 = json.loads((Path(model) / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    flags = {"safety_checker": None, "requires_safety_checker": False} if sd15 else {}
    pipe = DiffusionPipeline.from_pretrained(model, **flags)
    pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    if adapter is not None:
        pipe.load_lora_weights(str(adapter))
    accepted = signature(pipe.__call__).parameters
    # Qwen-Image's classifier-free guidance is `true_cfg_scale`, active with a negative prompt (its examples' " ")
    true_cfg = type(pipe).__name__ == "QwenImagePipeline"
    options = {"num_inference_steps": steps, "true_cfg_scale" if true_cfg else "guidance_scale": guidance_scale}
    if true_cfg:
        options["negative_prompt"] = " "
    if text_tokens is not None and "max_sequence_length" in accepted:
        options["max_sequence_length"] = text_tokens
    image = pipe(
        prompt=prompt,  # by name: FLUX.2's pipelines take reference images first
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(seed),
        **{key: value for key, value in options.items() if value is not None},
    ).images[0]
    return np.asarray(image, dtype=np.int16)


ADAPTER_KINDS = {
    "lora": {"type": "lora"},
    "locon": {"type": "locon", "conv_rank": 2, "conv_alpha": 1},
    "loha": {"type": "loha"},
    "lokr": {"type": "lokr"},
    "dora": {"type": "lora", "dora": True},
}


@pytest.fixture(scope="session")
def trained_adapters(tiny_sd: Path, shapes_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small adapter per algorithm, trained by lora-train (large learning rate so the change is visible)."""
    folder = tmp_path_factory.mktemp("adapters")
    made = {}
    for kind, adapter in ADAPTER_KINDS.items():
        raw = {
            "model": {"path": str(tiny_sd)},
            "data": {"folder": str(shapes_data), "resolution": 64},
            "adapter": {"rank": 4, "alpha": 2, **adapter},
            "train": {"steps": 3, "learning_rate": 3e-2, "batch_size": 2},
            "output": {"dir": str(folder / kind), "name": kind},
        }
        made[kind] = train_preset(raw, kind)
    return made
