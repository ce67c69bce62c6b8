"""Atomic writes and image loading details the trainer relies on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from lora_cli.io.atomic import atomic_directory, write_text_atomic
from lora_cli.training.data import load_pixels


def test_atomic_write_leaves_old_file_on_failure_and_normal_permissions(tmp_path: Path) -> None:
    target = tmp_path / "adapter.txt"
    write_text_atomic(target, "first")
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "ckpt") as tmp:
        (tmp / "part").write_text("half")
        raise RuntimeError("killed")
    assert not (tmp_path / "ckpt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.txt"]
    assert target.read_text() == "first"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_exif_rotation_alpha_and_palette_images_load_as_rgb(tmp_path: Path) -> None:
    # A 40x20 image, left half red; EXIF orientation 6 means "rotate 90 degrees clockwise to display".
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    pixels = load_pixels(tmp_path / "rotated.jpg", (16, 16))
    # Displayed upright it is 20 wide and 40 tall with red on top; centre-cropped to a square it is
    # mostly red in the top rows and blue in the bottom rows.
    assert pixels.shape == (3, 16, 16)
    assert pixels[0, 1].mean() > 0.8 and pixels[2, 1].mean() < -0.8
    assert pixels[2, -2].mean() > 0.8 and pixels[0, -2].mean() < -0.8

    transparent = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    transparent.save(tmp_path / "alpha.png")
    assert torch.allclose(load_pixels(tmp_path / "alpha.png", (8, 8)), torch.ones(3, 8, 8))  # on white

    Image.new("P", (8, 8), 0).save(tmp_path / "palette.png")
    assert load_pixels(tmp_path / "palette.png", (4, 4)).shape == (3, 4, 4)


def test_checkpoint_state_round_trips_exactly_without_pickle(tmp_path: Path) -> None:
    from lora_cli.training.checkpoint import TrainingState, load_checkpoint, save_checkpoint

    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    optimizer = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4), "note": "x"}},
        "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": [0]}],
    }
    state = TrainingState(
        3,
        6,
        optimizer,
        {"last_epoch": 3, "base_lrs": [0.1]},
        torch.arange(5, dtype=torch.uint8),
        [],
        {"train": {"steps": 9}},
        scaler.state_dict(),
        processes=2,
    )
    save_checkpoint(tmp_path / "step-000003", {"a.lora_down.weight": torch.ones(2, 2)}, state)
    adapter, back = load_checkpoint(tmp_path / "step-000003")
    assert torch.equal(adapter["a.lora_down.weight"], torch.ones(2, 2))
    assert back.grad_scaler == scaler.state_dict() and back.scheduler == state.scheduler
    assert back.optimizer["param_groups"][0]["betas"] == (0.9, 0.99) and back.optimizer["state"][0]["note"] == "x"
    assert torch.equal(back.optimizer["state"][0]["exp_avg"], optimizer["state"][0]["exp_avg"])
    assert (back.step, back.micro_step, back.processes) == (3, 6, 2) and torch.equal(back.torch_rng, state.torch_rng)
