"""Shared fixtures: a tiny SD pipeline and a small dataset, built once per session and loaded from disk."""

from __future__ import annotations

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


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lora_cli.toy.shapes import write_dataset

    folder = tmp_path_factory.mktemp("data") / "stars"
    write_dataset(folder, [("yellow", "star"), ("red", "circle")], per_pair=3, size=64, seed=1)
    return folder


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


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `lora-train` exactly as a user does (a fresh process, the console entry point)."""
    command = [sys.executable, "-c", "from lora_cli.cli.train import main; main()", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=600)
