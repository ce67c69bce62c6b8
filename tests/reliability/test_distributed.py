"""Two CPU processes over gloo (torchrun) against one process with the same effective batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.conftest import run_cli
from tests.reliability.launch import assert_same_updates, torchrun

# Run on one xdist worker: these tests start process groups on accelerate default port.
pytestmark = pytest.mark.xdist_group(name="processes")


def test_two_processes_train_what_one_process_trains_with_the_same_effective_batch(write_preset, tmp_path) -> None:
    steps = 3
    preset = write_preset(train={"steps": steps, "batch_size": 2})
    two = torchrun(2, str(preset), "--no-progress", "--set", f"output.dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_cli(
        str(preset), "--no-progress", "--set", "train.batch_size=4", "--set", f"output.dir={tmp_path / 'one'}"
    )
    assert one.returncode == 0, one.stderr
    # Same samples, noise and timesteps: the logged (all-process mean) losses agree to float rounding.
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("one", "two")]  # fmt: skip
    assert len(losses[0]) == steps and all(abs(a - b) < 1e-5 for a, b in zip(*losses, strict=True)), losses
    # The adapters differ only by the order of float sums (DDP averages gradients across processes), which
    # Adam's normalisation amplifies for near-zero gradients.
    assert_same_updates(tmp_path / "one" / "lora.safetensors", tmp_path / "two" / "lora.safetensors")
    # Every rank ended with identical weights (checked by the trainer before rank 0 writes), and only rank 0
    # wrote: one adapter, one metrics line per step.
    assert not list((tmp_path / "two").glob("*.tmp"))


def test_checkpoint_from_two_processes_resumes_on_one(write_preset, tmp_path: Path) -> None:
    """Two processes at batch 2 stop at step 2; one process at batch 4 (the same global batch) finishes, and the
    result matches a run that used one process at batch 4 throughout."""
    preset = write_preset(train={"steps": 2, "batch_size": 2}, output={"dir": str(tmp_path / "run"), "save_every": 2})
    first = torchrun(2, str(preset), "--no-progress")
    assert first.returncode == 0, first.stderr[-3000:]
    one_process = ("--set", "train.batch_size=4", "--set", "train.steps=4")
    resumed = run_cli(str(preset), "--no-progress", "--resume", *one_process)
    assert resumed.returncode == 0, resumed.stderr
    assert "at step 2" in resumed.stderr
    with safe_open(tmp_path / "run" / "lora.safetensors", "pt") as handle:
        assert handle.metadata()["lora_cli.step"] == "4"
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    reference = run_cli(str(preset), "--no-progress", *one_process, "--set", f"output.dir={tmp_path / 'ref'}")
    assert reference.returncode == 0, reference.stderr
    assert_same_updates(tmp_path / "ref" / "lora.safetensors", tmp_path / "run" / "lora.safetensors")
    changed = run_cli(str(preset), "--no-progress", "--resume", "--set", "train.batch_size=3", "--set", "train.steps=6")
    assert changed.returncode == 2 and "train.batch_size" in changed.stderr


def test_two_processes_share_generated_prior_images_and_overwrite_a_run(write_preset, tmp_path: Path) -> None:
    """The main process draws the class images first and the other reads them (both drawing into one folder
    crashed one run in three); with --overwrite only the main process clears the earlier run."""
    preset = write_preset(
        train={"steps": 1, "batch_size": 1},
        prior={"prompts": ["a shape"], "images_per_prompt": 2, "steps": 2},
        output={"dir": str(tmp_path / "run")},
    )
    for extra in ((), ("--overwrite",)):
        result = torchrun(2, str(preset), "--no-progress", *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        generated = list((tmp_path / "run" / "prior").glob("*/prior_*.png"))
        assert len(generated) == 2
        assert not list((tmp_path / "run").rglob(".*.tmp"))
