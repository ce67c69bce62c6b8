"""FSDP on two CPU processes over gloo: the base is really split, training matches DDP and one process, sharded
checkpoints resume exactly (sharded or not), and settings that cannot be sharded are refused in one line."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from lora_cli.config import load_preset
from lora_cli.errors import PresetError
from lora_cli.planning import parse_size
from lora_cli.training.sharding import refuse_unsupported_launch, wants_sharding
from tests.conftest import run_cli
from tests.reliability.launch import TRAIN, accelerate_launch, assert_same_updates, torchrun

# Run on one xdist worker: these tests start process groups on accelerate's default port.
pytestmark = pytest.mark.xdist_group(name="processes")


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def held(stderr: str) -> tuple[int, float]:
    """Bytes and fraction from the line `FSDP: ... this process holds SIZE (P%) of its SIZE of base weights`."""
    match = re.search(r"this process holds ([\d.]+ \w+) \((\d+)%\) of its", " ".join(stderr.split()))
    assert match, stderr[-2000:]
    return parse_size(match[1]), int(match[2]) / 100


def test_fsdp_splits_the_base_and_trains_what_ddp_and_one_process_train(write_preset, tmp_path: Path) -> None:
    """Text-encoder adapter (averaged outside DDP/FSDP), LoCon on convolutions, accumulation over 2 micro-batches."""
    preset = write_preset(
        adapter={"rank": 4, "alpha": 8, "type": "locon", "text_encoder": True},
        train={"steps": 3, "batch_size": 1, "gradient_accumulation": 2, "learning_rate": "1e-3"},
    )
    runs = {name: ("--no-progress", "--set", f"output.dir={tmp_path / name}") for name in ("ddp", "fsdp", "one")}
    ddp = torchrun(2, str(preset), *runs["ddp"])
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    fsdp = torchrun(2, str(preset), *runs["fsdp"], "--set", "distributed.strategy=fsdp")
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    assert 0.45 < held(fsdp.stderr)[1] < 0.55  # each process holds half of the denoiser's weights
    assert "FSDP" not in ddp.stderr
    # The memory planner's shard is what the run holds (rank 0 holds the larger half of odd-sized rows).
    plan = run_cli(str(preset), "--plan", "--processes", "2", "--set", "distributed.strategy=fsdp")
    assert plan.returncode == 0 and "2 processes (FSDP" in plan.stdout, plan.stderr
    planned = parse_size(re.search(r"weights: unet \(1/2 shard\)\s+([\d.]+ \w+)", plan.stdout)[1])
    assert 0.97 < held(fsdp.stderr)[0] / planned < 1.05
    misuse = run_cli(str(preset), "--processes", "2")
    assert misuse.returncode == 2 and "--processes is for --plan" in misuse.stderr
    one = run_cli(str(preset), *runs["one"], "--set", "train.batch_size=2")
    assert one.returncode == 0, one.stderr
    for name in ("ddp", "fsdp"):
        assert all(abs(a - b) < 1e-5 for a, b in zip(losses(tmp_path / "one"), losses(tmp_path / name), strict=True))
        assert_same_updates(tmp_path / "one" / "lora.safetensors", tmp_path / name / "lora.safetensors")
    assert any(key.startswith("lora_te_") for key in load_file(tmp_path / "fsdp" / "lora.safetensors"))


def test_fsdp_checkpoint_resumes_exactly_sharded_and_on_one_process(write_preset, tmp_path: Path) -> None:
    """A sharded run that stops at step 2 and resumes sharded ends bit-identical to an uninterrupted one; the
    same checkpoint (full tensors) resumed by one process at the same global batch ends within float rounding."""
    preset = write_preset(
        train={"steps": 4, "batch_size": 2}, output={"save_every": 2}, distributed={"strategy": "fsdp"}
    )
    whole = torchrun(2, str(preset), "--no-progress", "--set", f"output.dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr[-3000:]
    for name in ("sharded", "single"):  # the run as it was when killed after the step-2 checkpoint
        shutil.copytree(tmp_path / "whole", tmp_path / name)
        shutil.rmtree(tmp_path / name / "checkpoints" / "step-000004")
        (tmp_path / name / "lora.safetensors").unlink()
    sharded = torchrun(2, str(preset), "--no-progress", "--resume", "--set", f"output.dir={tmp_path / 'sharded'}")
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert "at step 2" in sharded.stderr
    expected = load_file(tmp_path / "whole" / "lora.safetensors")
    resumed = load_file(tmp_path / "sharded" / "lora.safetensors")
    assert all(torch.equal(expected[key], resumed[key]) for key in expected)
    single = run_cli(
        str(preset), "--no-progress", "--resume", "--set", "train.batch_size=4", "--set",
        f"output.dir={tmp_path / 'single'}",
    )  # fmt: skip
    assert single.returncode == 0, single.stderr
    assert_same_updates(tmp_path / "whole" / "lora.safetensors", tmp_path / "single" / "lora.safetensors")


def test_accelerate_fsdp_config_shards_a_dit_and_every_process_draws_previews(tmp_path: Path, shapes_data) -> None:
    """The shipped accelerate configs on a Flux-shaped DiT: FSDP (from the config alone) with gradient
    checkpointing trains what DDP trains, and previews (which need every process when sharded) are written."""
    from lora_cli.toy.tiny_dits import build_tiny_flux

    flux = build_tiny_flux(tmp_path / "flux", blocks=(2, 2))
    preset = tmp_path / "flux.yaml"
    preset.write_text(
        json.dumps({
            "model": {"path": str(flux)},
            "data": {"folder": str(shapes_data), "resolution": 64},
            "adapter": {"rank": 4, "alpha": 4},
            "train": {"steps": 3, "batch_size": 1, "learning_rate": 1e-3, "gradient_checkpointing": True},
            "sample": {"prompts": ["a red circle"], "steps": 2},
        })
    )  # fmt: skip
    fsdp = accelerate_launch("fsdp.yaml", str(preset), "--no-progress", "--set", f"output.dir={tmp_path / 'fsdp'}")
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    assert held(fsdp.stderr)[1] < 0.55
    assert "view tensor" not in fsdp.stderr
    ddp = accelerate_launch("multi-gpu.yaml", str(preset), "--no-progress", "--set", f"output.dir={tmp_path / 'ddp'}")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert_same_updates(tmp_path / "ddp" / "lora.safetensors", tmp_path / "fsdp" / "lora.safetensors")
    previews = sorted(path.name for path in (tmp_path / "fsdp" / "samples").iterdir())
    assert previews == ["before-after.png", "step-000000.png", "step-000003.png"]


NAN_ON_FOURTH_MICRO_BATCH = (
    """
import lora_cli.training.loop as loop
original, calls = loop.micro_batch_loss, []
def nan_on_fourth(session, samples):
    calls.append(1)
    loss = original(session, samples)
    return loss * float("nan") if len(calls) == 4 else loss
loop.micro_batch_loss = nan_on_fourth
"""
    + TRAIN
)


def test_a_skipped_step_leaves_no_gradient_behind_under_fsdp(write_preset, tmp_path: Path) -> None:
    """Step 2's last micro-batch has a NaN loss and is skipped (train.skip_nonfinite). Its first micro-batch's
    gradient, which FSDP holds outside the parameters while synchronisation is paused, must not reach step 3:
    the sharded run ends where DDP ends."""
    preset = write_preset(train={"steps": 3, "batch_size": 1, "gradient_accumulation": 2, "skip_nonfinite": 1})
    for strategy in ("ddp", "fsdp"):
        args = (
            "--no-progress",
            "--set",
            f"output.dir={tmp_path / strategy}",
            "--set",
            f"distributed.strategy={strategy}",
        )
        result = torchrun(2, str(preset), *args, code=NAN_ON_FOURTH_MICRO_BATCH)
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads((tmp_path / strategy / "metrics.jsonl").read_text().splitlines()[-1])["skipped"] == 1
    assert_same_updates(tmp_path / "ddp" / "lora.safetensors", tmp_path / "fsdp" / "lora.safetensors")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.quantize=nf4", "model.quantize: nf4"),
        ("train.mixed_precision=fp16", "train.mixed_precision: fp16"),
        ("train.optimizer=adamw8bit", "train.optimizer: adamw8bit"),
        ("train.optimizer=prodigy", "train.optimizer: prodigy"),
    ],
)
def test_settings_fsdp_cannot_shard_are_refused(tmp_path: Path, override: str, message: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("model: {path: m}\ndata: {folder: d}\ntrain: {steps: 1}\ndistributed: {strategy: fsdp}\n")
    preset = load_preset(path, [override])
    with pytest.raises(PresetError, match=re.escape(message)):
        wants_sharding(preset, SimpleNamespace(num_processes=2))
    assert not wants_sharding(preset, SimpleNamespace(num_processes=1))  # one process: nothing to shard


def test_accelerate_fsdp_config_alone_asks_for_sharding(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("model: {path: m}\ndata: {folder: d}\ntrain: {steps: 1}\n")
    preset = load_preset(path)
    assert not wants_sharding(preset, SimpleNamespace(num_processes=2))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert wants_sharding(preset, SimpleNamespace(num_processes=2))


def test_deepspeed_config_is_refused_in_one_line(write_preset, monkeypatch) -> None:
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(PresetError, match="DeepSpeed, which lora-cli does not run under"):
        refuse_unsupported_launch()
    result = run_cli(str(write_preset()), "--no-progress")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: the accelerate config selects DeepSpeed")


@pytest.mark.parametrize("name", ["z-image", "qwen-image"])  # (FLUX.2 measured too: its blocks shard as Flux's)
def test_fsdp_trains_the_llm_dits_as_one_process_does(name: str, tmp_path: Path, shapes_data) -> None:
    """The bases with LLM text encoders sharded over two processes (the text encoder whole, its embeddings
    cached first): the same losses and adapter as one process with the same global batch."""
    from importlib import import_module

    from tests.conftest import TINY_BUILDERS

    module, function = TINY_BUILDERS[name].split(":")
    base = getattr(import_module(module), function)(tmp_path / "base")
    preset = tmp_path / "preset.yaml"
    preset.write_text(
        json.dumps({
            "model": {"path": str(base), "max_text_tokens": 16},
            "data": {"folder": str(shapes_data), "resolution": 64},
            "adapter": {"rank": 4, "alpha": 4, "targets": "attention_ff"},
            "train": {"steps": 3, "batch_size": 1, "learning_rate": 1e-3},
            "cache": {"text_embeddings": True},
        })
    )  # fmt: skip
    fsdp = torchrun(2, str(preset), "--no-progress", "--set", f"output.dir={tmp_path / 'fsdp'}",
                    "--set", "distributed.strategy=fsdp")  # fmt: skip
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    assert held(fsdp.stderr)[1] < 0.6
    one = run_cli(
        str(preset), "--no-progress", "--set", f"output.dir={tmp_path / 'one'}", "--set", "train.batch_size=2"
    )
    assert one.returncode == 0, one.stderr[-3000:]
    assert all(abs(a - b) < 1e-5 for a, b in zip(losses(tmp_path / "one"), losses(tmp_path / "fsdp"), strict=True))
    expected, got = (load_file(tmp_path / run / "lora.safetensors") for run in ("one", "fsdp"))
    assert expected.keys() == got.keys()
    for key in (key for key in expected if ".lora_B." in key):  # each layer's update within 1%
        update = {run: tensors[key] @ tensors[key.replace("lora_B", "lora_A")] for run, tensors in (("one", expected),
                  ("fsdp", got))}  # fmt: skip
        # (Qwen-Image's last block's text stream feeds nothing: its update stays zero in both)
        assert (update["fsdp"] - update["one"]).norm() <= 0.01 * update["one"].norm() + 1e-12, key
