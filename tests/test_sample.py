"""`lora-sample`: seeds, scales, grids, PNG metadata, every algorithm, and its errors."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from lora_cli.sampling.png import read_png_parameters
from lora_cli.sampling.run import SampleRequest, run_sampling
from tests.conftest import diffusers_image, read_for_base, run_command, train_preset


def sample_cli(*args: str) -> subprocess.CompletedProcess:
    return run_command("sample", *args)


@pytest.fixture
def adapters(trained_adapters: dict[str, Path]) -> dict[str, Path]:
    return trained_adapters


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def request(tiny_sd: Path, out: Path, **changes) -> SampleRequest:
    values = {"base": str(tiny_sd), "prompts": ["a yellow star"], "out": out, "steps": 3, "size": 64, "seed": 7}
    return SampleRequest(**{**values, **changes})


def test_seeds_scales_grid_and_metadata(tiny_sd: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    console = Console(quiet=True)
    lora = adapters["lora"]
    written = run_sampling(
        request(tiny_sd, tmp_path / "a", adapters=[(lora, 1.0)], scales=[0.0, 1.0], compare=True, images_per_prompt=2),
        console,
    )
    images, grid = written[:-1], written[-1]
    assert len(images) == 2 * 3  # 2 rows (seeds 7, 8) x 3 columns (base, lora@0, lora@1)
    by_name = {p.name: p for p in images}
    base, zero, one = (by_name[f"000-0{i}-{label}-seed7.png"] for i, label in enumerate(["base", "lora@0", "lora@1"]))
    assert np.array_equal(pixels(base), pixels(zero)), "scale 0 must equal the base image"
    assert np.abs(pixels(base) - pixels(one)).max() > 3, "scale 1 must change the image"
    assert not np.array_equal(pixels(base), pixels(by_name["001-00-base-seed8.png"])), "different seeds"

    again = run_sampling(request(tiny_sd, tmp_path / "b", adapters=[(lora, 1.0)], images_per_prompt=2), console)
    assert np.array_equal(pixels(again[0]), pixels(one)), "the same seeds draw the same images"

    params = read_png_parameters(one)
    assert params["seed"] == 7 and params["prompt"] == "a yellow star" and params["steps"] == 3
    assert params["adapters"] == [{"name": "lora.safetensors", "path": str(lora), "scale": 1.0}]
    assert "Negative prompt:" in Image.open(one).text["parameters"]
    grid_image = Image.open(grid)
    assert grid_image.size[0] > 3 * 64 and grid_image.size[1] == 16 + 2 * 64  # label row + two 64-px rows


def test_patched_lora_draws_what_diffusers_loader_draws(tiny_sd: Path, adapters: dict[str, Path], tmp_path: Path):

    ours = run_sampling(request(tiny_sd, tmp_path, adapters=[(adapters["lora"], 1.0)]), Console(quiet=True))[0]
    theirs = diffusers_image(tiny_sd, adapters["lora"], "a yellow star", 7)
    assert np.abs(pixels(ours) - theirs).max() <= 1  # 8-bit rounding only


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_lycoris_adapters_match_the_peft_layers_they_were_trained_in(
    kind: str, tiny_sd: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    from lora_cli.adapters.loading import load_adapter_file
    from lora_cli.config.schema import ModelSection
    from lora_cli.models import load_base
    from lora_cli.sampling import generate_images

    patched = run_sampling(
        request(tiny_sd, tmp_path, adapters=[(adapters[kind], 1.0)], compare=True), Console(quiet=True)
    )
    base_image, adapted_image = pixels(patched[0]), pixels(patched[1])
    assert np.abs(base_image - adapted_image).max() > 3

    base = load_base(ModelSection(path=str(tiny_sd)))
    load_adapter_file(base.trainable_components(), base.architecture, adapters[kind])
    bypass = generate_images(base.architecture.build_pipeline(base), ["a yellow star"], [7], 3, 7.5, "", 64)[0]
    assert np.abs(adapted_image - np.asarray(bypass, dtype=np.int16)).max() <= 2


def test_sample_errors_are_one_line(tiny_sd: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    stray = tmp_path / "stray.safetensors"
    save_file({"lora_unet_nothing_here.lora_down.weight": torch.zeros(2, 2)}, str(stray))
    cases = [
        (["--adapter", str(tmp_path / "missing.safetensors")], "file not found"),
        (["--adapter", f"{adapters['lora']}:strong"], "the scale after ':' must be a number"),
        (["--adapter", str(stray)], "none of its 1 layers matches this stable-diffusion base"),
        (["--adapter", str(adapters["lora"]), "--base", "builtin:shapes"], "does not fit this base"),
        (["--scales", "0,x"], "expected comma-separated numbers"),
    ]
    for extra, message in cases:
        args = ["--base", str(tiny_sd), "--prompt", "a red circle", "--steps", "2", "--out", str(tmp_path / "o")]
        result = sample_cli(*args, *extra)
        assert result.returncode == 2, (extra, result.stderr)
        assert message in result.stderr.strip().splitlines()[-1] and "Traceback" not in result.stderr


def test_bypass_switching_between_adapters_matches_weight_patching(
    tiny_sd: Path, shapes_data: Path, adapters, tmp_path
):
    """Two adapters of one algorithm are injected side by side and switched; each column must equal what
    the weight patcher (exact merged weights) draws, and scale 0 / the base column the plain base."""
    from lora_cli.sampling.patcher import WeightPatcher
    from lora_cli.sampling.switcher import uses_bypass

    raw = {
        "model": {"path": str(tiny_sd)},
        "data": {"folder": str(shapes_data), "resolution": 64},
        "adapter": {"rank": 2, "targets": "attention_ff"},
        "train": {"steps": 2, "learning_rate": 3e-2, "batch_size": 2, "seed": 9},
        "output": {"dir": str(tmp_path / "second"), "name": "second"},
    }
    second = train_preset(raw, "second")
    pair = [(adapters["lora"], 0.8), (second, 1.0)]
    assert uses_bypass([read_for_base(p, tiny_sd) for p, _ in pair])
    assert not uses_bypass([read_for_base(adapters[kind], tiny_sd) for kind in ("lora", "loha")])
    common = {"scales": [0.0, 0.8], "compare": True, "images_per_prompt": 2}
    switched = run_sampling(request(tiny_sd, tmp_path / "bypass", adapters=pair, **common), Console(quiet=True))

    import lora_cli.sampling.run as sampling_run

    original = sampling_run.make_switcher

    def patcher(components, files):
        patching = WeightPatcher(components)
        for file in files:
            patching.add(file)
        return patching

    sampling_run.make_switcher = patcher
    try:
        patched = run_sampling(request(tiny_sd, tmp_path / "patch", adapters=pair, **common), Console(quiet=True))
    finally:
        sampling_run.make_switcher = original
    assert [p.name for p in switched] == [p.name for p in patched]
    for a, b in zip(switched[:-1], patched[:-1], strict=True):
        assert np.abs(pixels(a) - pixels(b)).max() <= 1, a.name
    by_name = {p.name: p for p in switched}
    assert np.array_equal(pixels(by_name["000-00-base-seed7.png"]), pixels(by_name["000-01-lora@0-seed7.png"]))
    assert (
        np.abs(pixels(by_name["000-02-lora@0.8-seed7.png"]) - pixels(by_name["000-04-second@0.8-seed7.png"])).max() > 3
    )
