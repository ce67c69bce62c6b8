"""Start `lora-train` on several CPU processes over gloo, and compare the adapters they write."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

TRAIN = "from lora_cli.cli.train import main; main()"
ACCELERATE_CONFIGS = Path(__file__).parents[2] / "presets" / "accelerate"


def torchrun(processes: int, *args: str, code: str = TRAIN) -> subprocess.CompletedProcess:
    """`lora-train ARGS` (or other Python `code` that ends in it) on several processes, as
    ../shared/ENVIRONMENT-NOTES.md says gives real DDP on CPU."""
    command = [sys.executable, "-m", "torch.distributed.run", "--no-python", "--standalone"]
    command += ["--nproc_per_node", str(processes), sys.executable, "-c", code, *args]
    return _run(command)


def accelerate_launch(config: str, *args: str) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file presets/accelerate/CONFIG.yaml lora-train ARGS`, on CPUs."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIGS / config)]
    return _run([*launcher, "--no_python", sys.executable, "-c", TRAIN, *args])


def _run(command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def assert_same_updates(expected_file: Path, got_file: Path) -> None:
    """Tolerance: each layer's weight update (up @ down) within 1% (relative Frobenius norm) of the
    expected one (measured: at most 0.3%). Reads kohya (lora_up/lora_down) and diffusers (lora_B/lora_A) keys."""
    expected_tensors, got_tensors = load_file(expected_file), load_file(got_file)
    assert expected_tensors.keys() == got_tensors.keys()
    for key in expected_tensors:
        for up_name, down_name in (("lora_up", "lora_down"), ("lora_B", "lora_A")):
            if f".{up_name}." not in key:
                continue
            expected, got = (
                tensors[key].flatten(1) @ tensors[key.replace(up_name, down_name)].flatten(1)
                for tensors in (expected_tensors, got_tensors)
            )
            assert expected.norm() > 0 and (got - expected).norm() <= 0.01 * expected.norm(), key
