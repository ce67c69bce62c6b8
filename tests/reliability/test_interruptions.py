"""Killed, interrupted and out-of-space runs: nothing partial is visible and `--resume` finishes the job."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from lora_cli.errors import CheckpointError
from lora_cli.training.checkpoint import list_checkpoints, load_checkpoint
from tests.conftest import run_cli

TRAIN = "from lora_cli.cli.train import main; main()"


def start(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", TRAIN, *args, "--no-progress"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_until(condition: Callable[[], bool], process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended early: {process.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.02)


def assert_nothing_partial(run: Path) -> None:
    """Every visible file of a run folder is complete (temporary files are dot-named and removed on restart)."""
    for folder in list((run / "checkpoints").glob("step-*")):
        load_checkpoint(folder)
    if (run / "lora.safetensors").exists():
        load_file(run / "lora.safetensors")
    if (run / "metrics.jsonl").exists():
        for line in (run / "metrics.jsonl").read_text().splitlines():
            json.loads(line)


def adapters_equal(a: Path, b: Path) -> bool:
    first, second = load_file(a), load_file(b)
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_sigkill_at_several_points_then_resume_gives_the_uninterrupted_adapter(write_preset, tmp_path) -> None:
    preset = write_preset(train={"steps": 6, "batch_size": 2}, output={"save_every": 1, "keep_last": 2})
    reference = run_cli(str(preset), "--no-progress", "--set", f"output.dir={tmp_path / 'reference'}")
    assert reference.returncode == 0, reference.stderr
    kill_points: dict[str, Callable[[Path], bool]] = {
        "before-any-checkpoint": lambda run: (run / "preset.yaml").exists(),
        "after-checkpoint-2": lambda run: (run / "checkpoints" / "step-000002").exists(),
        "late": lambda run: (run / "checkpoints" / "step-000005").exists(),
    }
    for name, condition in kill_points.items():
        run = tmp_path / name
        process = start(str(preset), "--set", f"output.dir={run}")
        wait_until(lambda run=run, condition=condition: condition(run), process)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert_nothing_partial(run)
        resumed = run_cli(str(preset), "--no-progress", "--resume", "--set", f"output.dir={run}")
        assert resumed.returncode == 0, (name, resumed.stderr)
        assert adapters_equal(run / "lora.safetensors", tmp_path / "reference" / "lora.safetensors"), name
        assert not [p for p in run.rglob(".*.tmp")], f"{name}: temporary files left behind"
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2, 3, 4, 5, 6], (name, steps)


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_saves_a_checkpoint_and_exits_cleanly(stop_signal, write_preset, tmp_path) -> None:
    preset = write_preset(train={"steps": 5000, "batch_size": 2})
    run = tmp_path / "run"
    process = start(str(preset))
    metrics = run / "metrics.jsonl"
    wait_until(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, process)
    process.send_signal(stop_signal)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"stopped: {stop_signal.name} at step ") and "continue with --resume" in last, last
    assert "Traceback" not in stderr
    step = int(last.split(" at step ")[1].split(":")[0])
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == [f"step-{step:06d}"]
    assert not (run / "lora.safetensors").exists()
    resumed = run_cli(str(preset), "--no-progress", "--resume", "--set", f"train.steps={step + 2}")
    assert resumed.returncode == 0 and f"at step {step}" in resumed.stderr, resumed.stderr
    assert json.loads(metrics.read_text().splitlines()[-1])["step"] == step + 2


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(write_preset, tmp_path, monkeypatch) -> None:
    """The disk fills up while the second checkpoint is written (its file write fails with ENOSPC halfway)."""
    from lora_cli.config import load_preset
    from lora_cli.training import checkpoint
    from lora_cli.training.run import train

    writes: list[Path] = []
    real_save = checkpoint.save_tensors

    def save_until_full(path, tensors, metadata) -> None:
        writes.append(Path(path))
        if len(writes) == 3:  # two files per checkpoint: the second checkpoint's first file
            Path(path).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(path, tensors, metadata)

    monkeypatch.setattr(checkpoint, "save_tensors", save_until_full)
    preset = load_preset(write_preset(output={"save_every": 1}))
    with pytest.raises(CheckpointError) as failure:
        train(preset, Console(quiet=True), show_progress=False)
    message = str(failure.value)
    assert "step 2: cannot write checkpoint" in message and "No space left on device" in message
    assert "step-000001 is intact" in message and "--resume" in message
    checkpoints = tmp_path / "run" / "checkpoints"
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step-000001"]
    load_checkpoint(checkpoints / "step-000001")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000001"], "a partial checkpoint is visible"
    monkeypatch.setattr(checkpoint, "save_tensors", real_save)  # space was freed
    adapter = train(preset, Console(quiet=True), resume=True, show_progress=False)
    assert adapter is not None and load_file(adapter)


def test_isolated_non_finite_batches_are_skipped_when_allowed(write_preset, tmp_path, monkeypatch) -> None:
    """The third micro-batch's loss is NaN: by default the run stops there with the step and a hint (keeping
    its checkpoints); with train.skip_nonfinite it drops that step, says so in the metrics and finishes."""
    from lora_cli.config import load_preset
    from lora_cli.errors import TrainingDivergedError
    from lora_cli.training import loop
    from lora_cli.training.run import train

    real_loss, calls = loop.micro_batch_loss, []

    def loss_with_a_bad_batch(session, samples):
        calls.append(1)
        loss = real_loss(session, samples)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(loop, "micro_batch_loss", loss_with_a_bad_batch)
    with pytest.raises(TrainingDivergedError, match="step 3: loss became nan.*train.skip_nonfinite"):
        train(load_preset(write_preset(output={"save_every": 1})), Console(quiet=True), show_progress=False)
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-000001", "step-000002"]

    calls.clear()
    preset = load_preset(write_preset(train={"skip_nonfinite": 1}, output={"dir": str(tmp_path / "skipping")}))
    adapter = train(preset, Console(quiet=True), show_progress=False)
    lines = [json.loads(line) for line in (tmp_path / "skipping" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4] and lines[-1]["skipped"] == 1 and "skipped" not in lines[0]
    assert all(torch.isfinite(t).all() for t in load_file(adapter).values())


def test_out_of_gpu_memory_is_one_line_pointing_at_the_planner(write_preset, tmp_path, monkeypatch, capsys) -> None:
    """torch's OutOfMemoryError at step 3 (raised here by a stand-in for the loss): one line with exit code 4
    and the planner to ask; the checkpoints written before are intact."""
    from lora_cli.cli.errors import run_app
    from lora_cli.cli.train import app
    from lora_cli.training import loop

    real_loss, calls = loop.micro_batch_loss, []

    def loss_until_memory_runs_out(session, samples):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 11.76 GiB total)")
        return real_loss(session, samples)

    monkeypatch.setattr(loop, "micro_batch_loss", loss_until_memory_runs_out)
    monkeypatch.setattr(sys, "argv", ["lora-train", str(write_preset(output={"save_every": 1})), "--no-progress"])
    with pytest.raises(SystemExit) as stopped:
        run_app(app, "lora-train")
    assert stopped.value.code == 4
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("error: out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB")
    assert "lora-train PRESET --plan --vram SIZE" in message
    saved = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in saved] == ["step-000001", "step-000002"] and load_checkpoint(saved[-1])
