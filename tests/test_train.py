"""End-to-end `lora-train` runs on the tiny pipeline: outputs, diffusers compatibility, exact resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import fixed_batch_losses, read_for_base, run_cli


def load_pipeline(folder: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def draw(pipe) -> torch.Tensor:
    out = pipe(
        "a yellow star",
        num_inference_steps=3,
        height=64,
        width=64,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    )
    return out.images


def test_lora_train_writes_adapter_metadata_logs_and_previews(write_preset, tmp_path: Path, tiny_sd: Path) -> None:
    preset = write_preset(
        sample={"prompts": ["a yellow star"], "steps": 2},
        output={"dir": str(tmp_path / "run"), "save_every": 2},
    )
    result = run_cli(str(preset), "--no-progress")
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    adapter = run / "lora.safetensors"
    tensors = load_file(adapter)
    down = [k for k in tensors if k.endswith(".lora_down.weight")]
    assert len(down) == 32 and all(k.startswith("lora_unet_") for k in tensors)
    assert tensors["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.alpha"].item() == 8.0
    assert any(tensors[k.replace("lora_down", "lora_up")].abs().sum() > 0 for k in down), "adapter did not train"
    with safe_open(adapter, "pt") as handle:
        meta = handle.metadata()
    assert meta["lora_cli.algorithm"] == "lora" and meta["lora_cli.rank"] == "4" and meta["lora_cli.alpha"] == "8.0"
    assert meta["lora_cli.step"] == "4" and len(meta["lora_cli.base_fingerprint"]) == 64
    assert len(meta["lora_cli.dataset_fingerprint"]) == 64
    assert json.loads(meta["lora_cli.preset"])["train"]["learning_rate"] == 1e-3
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in json.loads(meta["lora_cli.targets"])["unet"]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert all(set(line) >= {"loss", "lr", "grad_norm"} for line in lines)
    assert (run / "loss.png").stat().st_size > 1000
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "before-after.png",
        "step-000000.png",
        "step-000004.png",
    ]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert not list(run.rglob("*.tmp")), "temporary files left behind"

    # The kohya-format file is read by diffusers' own loader and changes what the pipeline draws.
    pipe = load_pipeline(tiny_sd)
    before = draw(pipe)
    pipe.load_lora_weights(str(adapter))
    after = draw(pipe)
    assert (after - before).abs().max() > 1e-4

    # A second run into the same folder is refused instead of overwriting it.
    again = run_cli(str(preset), "--no-progress")
    assert again.returncode == 2 and "already holds a run" in again.stderr and "--resume" in again.stderr


def test_diffusers_format_matches_kohya_format_in_diffusers_loader(write_preset, tmp_path: Path, tiny_sd: Path) -> None:
    from rich.console import Console

    from lora_cli.config import load_preset
    from lora_cli.training.run import train

    console = Console(quiet=True)
    kohya = train(load_preset(write_preset(), []), console, show_progress=False)
    diffusers_file = train(
        load_preset(write_preset(), ["output.format=diffusers", f"output.dir={tmp_path / 'run2'}"]),
        console,
        show_progress=False,
    )
    keys = load_file(diffusers_file)
    assert all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    images = []
    for file in (kohya, diffusers_file):
        pipe = load_pipeline(tiny_sd)
        pipe.load_lora_weights(str(file))
        images.append(draw(pipe))
    # Same seed, same training: identical weights, and alpha (8) != rank (4) survives both layouts.
    torch.testing.assert_close(images[0], images[1], rtol=0, atol=1e-6)


def test_resumed_run_ends_with_the_same_adapter(write_preset, tmp_path: Path) -> None:
    from rich.console import Console

    from lora_cli.config import load_preset
    from lora_cli.training.run import train

    console = Console(quiet=True)
    overrides = [
        "train.steps=6",
        "output.save_every=3",
        "data.caption_dropout=0.3",
        "adapter.dropout=0.1",
        "train.scheduler=cosine",
        "train.warmup_steps=1",
        "train.gradient_accumulation=2",
        "train.min_snr_gamma=5",
        "train.noise_offset=0.05",
    ]
    full = train(load_preset(write_preset(), overrides), console, show_progress=False)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000003"

    resumed_dir = tmp_path / "resumed"
    resumed = train(
        load_preset(write_preset(), [*overrides, f"output.dir={resumed_dir}"]),
        console,
        resume_from=checkpoint,
        show_progress=False,
    )
    first, second = load_file(full), load_file(resumed)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    # The resumed run's log starts at the checkpoint.
    steps = [json.loads(line)["step"] for line in (resumed_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 5, 6]


def test_resume_latest_after_interruption_continues_in_place(write_preset, tmp_path: Path) -> None:
    from rich.console import Console

    from lora_cli.config import load_preset
    from lora_cli.training.run import train

    console = Console(quiet=True)
    preset_path = write_preset(train={"steps": 4}, output={"dir": str(tmp_path / "run"), "save_every": 2})
    reference_dir = tmp_path / "reference"
    reference = train(load_preset(preset_path, [f"output.dir={reference_dir}"]), console, show_progress=False)

    train(load_preset(preset_path, []), console, show_progress=False)
    run = tmp_path / "run"
    shutil.rmtree(run / "checkpoints" / "step-000004")  # as if killed after the step-2 checkpoint
    (run / "lora.safetensors").unlink()
    train(load_preset(preset_path, []), console, resume=True, show_progress=False)
    first, second = load_file(reference), load_file(run / "lora.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize(
    "adapter",
    [
        ["adapter.type=lora"],
        ["adapter.type=locon"],
        ["adapter.type=lora", "adapter.dora=true"],
        ["adapter.type=loha"],
        ["adapter.type=lokr", "train.learning_rate=2e-2"],  # LoKr's small factors want a larger step
    ],
    ids=["lora", "locon", "dora", "loha", "lokr"],
)
def test_overfitting_one_batch_lowers_the_loss(write_preset, tmp_path: Path, shapes_data: Path, adapter) -> None:
    targets = "adapter.targets=[to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2]"
    before, after = fixed_batch_losses(write_preset(), [targets, "train.learning_rate=5e-3", *adapter], shapes_data)
    assert after < 0.7 * before, (before, after)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.folder=/nonexistent/images"], "dataset folder does not exist"),
        (["model.path=/nonexistent/model"], "does not exist"),
        (["adapter.targets=[to_qq]"], "pattern `to_qq` matches no Linear/Conv2d layer; close names: to_q"),
        (["train.optimizer_args={foo: 1}"], "train.optimizer_args: adamw rejects them"),
    ],
)
def test_bad_runs_fail_with_one_line(write_preset, overrides: list[str], message: str) -> None:
    args = [str(write_preset())]
    for override in overrides:
        args += ["--set", override]
    result = run_cli(*args, "--no-progress")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], result.stderr
    assert "Traceback" not in result.stderr


def test_pickle_model_refused_and_resume_without_checkpoint_starts_over(write_preset, tmp_path: Path) -> None:
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04junk")
    result = run_cli(str(write_preset()), "--set", f"model.path={pickle}")
    assert result.returncode == 2 and "pass --allow-pickle" in result.stderr
    result = run_cli(str(write_preset()), "--resume", "--no-progress")
    assert result.returncode == 0 and "starting from step 0" in result.stderr, result.stderr
    assert (tmp_path / "run" / "lora.safetensors").is_file()


def test_dry_run_reports_plan_without_writing(write_preset, tmp_path: Path) -> None:
    result = run_cli(str(write_preset()), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "unet: 32 target modules" in result.stderr
    assert "trainable parameters: 9,984" in result.stderr
    assert "dataset: 6 images" in result.stderr
    assert "learning_rate: 0.001" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("optimizer", ["adamw8bit", "prodigy"])
def test_every_optimizer_trains_and_resumes_exactly(write_preset, tmp_path: Path, optimizer: str) -> None:
    from rich.console import Console

    from lora_cli.config import load_preset
    from lora_cli.training.run import train

    console = Console(quiet=True)
    lr = "1.0" if optimizer == "prodigy" else "1e-3"
    overrides = [f"train.optimizer={optimizer}", f"train.learning_rate={lr}", "train.steps=4", "output.save_every=2"]
    full = train(load_preset(write_preset(), overrides), console, show_progress=False)
    resumed = train(
        load_preset(write_preset(), [*overrides, f"output.dir={tmp_path / 'resumed'}"]),
        console,
        resume_from=tmp_path / "run" / "checkpoints" / "step-000002",
        show_progress=False,
    )
    first, second = load_file(full), load_file(resumed)
    assert any(v.abs().sum() > 0 for k, v in first.items() if "lora_up" in k)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_caches_tensorboard_and_text_encoder_adapter(write_preset, tmp_path: Path, tiny_sd: Path) -> None:
    from rich.console import Console

    from lora_cli.config import load_preset
    from lora_cli.training.run import train

    console = Console(quiet=True)
    cached = load_preset(
        write_preset(), ["cache.latents=true", "cache.text_embeddings=true", "logging.tensorboard=true"]
    )
    train(cached, console, show_progress=False)
    run = tmp_path / "run"
    assert len(list((run / "cache" / "latents").rglob("*.safetensors"))) == 6
    assert len(list((run / "cache" / "text").rglob("*.safetensors"))) == 3  # two captions + the empty one
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))

    # The cache is reused by the next run (entries are keyed by content), so the VAE is not needed again.
    before = {p: p.stat().st_mtime_ns for p in (run / "cache").rglob("*.safetensors")}
    train(cached, console, overwrite=True, show_progress=False)
    assert {p: p.stat().st_mtime_ns for p in (run / "cache").rglob("*.safetensors")} == before

    with_text = load_preset(write_preset(), ["adapter.text_encoder=true", f"output.dir={tmp_path / 'te'}"])
    adapter = load_file(train(with_text, console, show_progress=False))
    te_keys = [k for k in adapter if k.startswith("lora_te_text_model_encoder_layers_")]
    assert len([k for k in te_keys if k.endswith("lora_down.weight")]) == 12  # 2 layers x (q,k,v,out,fc1,fc2)
    pipe = load_pipeline(tiny_sd)
    pipe.load_lora_weights(str(tmp_path / "te" / "lora.safetensors"))
    assert any("lora" in name for name, _ in pipe.text_encoder.named_parameters())


def test_epochs_bf16_autocast_and_divergence(write_preset, tmp_path: Path) -> None:
    from lora_cli.config import load_preset
    from lora_cli.training.session import build_session, prepare_model, run_paths, scan_dataset

    # 6 images, repeats 2, batch 4 -> 3 batches per epoch; 3 epochs = 9 batches = 5 steps of 2 (the last short).
    preset = load_preset(
        write_preset(),
        ["train.steps=null", "train.epochs=3", "data.repeats=2", "train.batch_size=4", "train.gradient_accumulation=2"],
    )
    session = build_session(preset, run_paths(preset), *prepare_model(preset, scan_dataset(preset)))
    assert (session.batches_per_epoch, session.total_steps) == (3, 5)

    bf16 = run_cli(str(write_preset()), "--set", "train.mixed_precision=bf16", "--no-progress")
    assert bf16.returncode == 0, bf16.stderr

    diverging = run_cli(
        str(write_preset()),
        *("--set", "train.learning_rate=1e30", "--set", "train.max_grad_norm=null", "--set", "train.steps=20"),
        *("--set", f"output.dir={tmp_path / 'diverged'}", "--no-progress"),
    )
    assert diverging.returncode == 3, diverging.stderr
    assert "became" in diverging.stderr and "lower train.learning_rate" in diverging.stderr
    assert not (tmp_path / "diverged" / "lora.safetensors").exists()


def test_only_adapter_weights_train_and_prior_folder_is_weighted(write_preset, shapes_data: Path) -> None:
    from lora_cli.config import load_preset
    from lora_cli.training.session import prepare_model, scan_dataset

    preset = load_preset(write_preset(), [f"prior.folder={shapes_data}", "prior.weight=0.5", "data.repeats=2"])
    base, adapter, data = prepare_model(preset, scan_dataset(preset))
    trainable = [
        n for model in base.trainable_components().values() for n, p in model.named_parameters() if p.requires_grad
    ]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert data.weights == [1.0] * 6 + [0.5] * 6
    assert len(data.entries) == 6 * 2 + 6  # repeats apply to the training images only


@pytest.mark.parametrize("algorithm", ["lora", "locon"])
def test_diffusers_loader_draws_what_our_merged_weights_draw(write_preset, tmp_path: Path, tiny_sd: Path, algorithm):
    """An independent judge of key names and scaling: diffusers' `load_lora_weights` vs our own merge."""
    from rich.console import Console

    from lora_cli.adapters.functional import merged_weight
    from lora_cli.config import load_preset
    from lora_cli.training.run import train

    overrides = [f"adapter.type={algorithm}", "adapter.conv_rank=2", "adapter.conv_alpha=1", "train.learning_rate=1e-2"]
    adapter_file = train(load_preset(write_preset(), overrides), Console(quiet=True), show_progress=False)

    with_loader = load_pipeline(tiny_sd)
    with_loader.load_lora_weights(str(adapter_file))
    merged = load_pipeline(tiny_sd)
    tensors = read_for_base(adapter_file, tiny_sd).tensors
    assert any(isinstance(merged.unet.get_submodule(m), torch.nn.Conv2d) for _, m in tensors) == (algorithm == "locon")
    with torch.no_grad():
        for (_, module), named in tensors.items():
            weight = merged.unet.get_submodule(module).weight
            weight.copy_(merged_weight(weight, named))
    expected, got = draw(merged), draw(with_loader)
    assert (expected - draw(load_pipeline(tiny_sd))).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-4)


def test_target_presets_late_blocks_and_conv_rank_in_dry_run(write_preset) -> None:
    full = run_cli(str(write_preset()), "--dry-run", "--set", "adapter.type=locon", "--set", "adapter.conv_rank=2")
    assert full.returncode == 0, full.stderr
    assert "down_blocks.0.resnets.0.conv1" in full.stderr and "time_embedding.linear_1" in full.stderr
    late = run_cli(str(write_preset()), "--dry-run", "--set", "adapter.targets=attention_ff", "--set", "adapter.late=2")
    assert late.returncode == 0, late.stderr
    lines = late.stderr.splitlines()
    header = next(i for i, line in enumerate(lines) if "target modules" in line)
    modules = [line.strip() for line in lines[header + 1 :] if line.startswith("  ")]
    assert modules and all(m.startswith("up_blocks.") for m in modules)  # the last two blocks are up blocks
    assert any(m.endswith("ff.net.2") for m in modules) and not any("down_blocks" in m for m in modules)
    too_late = run_cli(str(write_preset()), "--dry-run", "--set", "adapter.late=9")
    assert too_late.returncode == 2 and "adapter.late: 9 is more than the denoiser's 5 blocks" in too_late.stderr


def test_trainer_refuses_bad_data_before_loading_and_trains_in_buckets(write_preset, tmp_path: Path, shapes_data: Path):
    from PIL import Image
    from rich.console import Console

    from lora_cli.config import load_preset
    from lora_cli.training.run import train
    from lora_cli.training.session import prepare_model, scan_dataset

    mixed = tmp_path / "mixed"
    shutil.copytree(shapes_data, mixed)
    for i, size in enumerate([(96, 48), (100, 50), (48, 96)]):  # two landscape, one portrait
        Image.new("RGB", size, (30 * i, 200, 90)).save(mixed / f"wide{i}.png")
        (mixed / f"wide{i}.txt").write_text(f"a green rectangle {i}")
    preset = load_preset(write_preset(), [f"data.folder={mixed}", "train.steps=3"])
    _, _, data = prepare_model(preset, scan_dataset(preset))
    assert sorted(set(data.buckets)) == [(40, 88), (64, 64), (88, 40)]  # area <= 64², steps of 8
    run = train(preset, Console(quiet=True), show_progress=False)
    assert run.is_file()

    broken = tmp_path / "broken"
    shutil.copytree(shapes_data, broken)
    (broken / "bad.png").write_bytes((shapes_data / "red_circle_0000.png").read_bytes()[:100])
    result = run_cli(str(write_preset()), "--set", f"data.folder={broken}", "--set", f"output.dir={tmp_path / 'o'}")
    assert result.returncode == 2 and "bad.png: cannot be decoded" in result.stderr
    assert not (tmp_path / "o").exists()


def test_half_precision_base_resume_guard_and_incomplete_files(write_preset, tmp_path: Path, tiny_sd: Path) -> None:
    from rich.console import Console
    from safetensors.torch import save_file

    from lora_cli.config import load_preset
    from lora_cli.errors import AdapterError, CheckpointError
    from lora_cli.training.run import train

    console = Console(quiet=True)
    # A frozen base stored in bfloat16 trains without autocast (inputs follow the base's dtype).
    half = train(load_preset(write_preset(), ["model.dtype=bfloat16", "train.steps=2"]), console, show_progress=False)
    assert half.is_file()

    overrides = ["train.steps=4", "output.save_every=2", f"output.dir={tmp_path / 'guarded'}"]
    train(load_preset(write_preset(), overrides), console, show_progress=False)
    checkpoint = tmp_path / "guarded" / "checkpoints" / "step-000002"
    changed = load_preset(write_preset(), [*overrides, "train.batch_size=1", f"output.dir={tmp_path / 'g2'}"])
    with pytest.raises(CheckpointError, match="different `train` settings \\(train.batch_size\\)"):
        train(changed, console, resume_from=checkpoint, show_progress=False)
    longer = load_preset(write_preset(), [*overrides, "train.steps=6", f"output.dir={tmp_path / 'g3'}"])
    assert train(longer, console, resume_from=checkpoint, show_progress=False).is_file()

    tensors = load_file(half)
    broken = tmp_path / "incomplete.safetensors"
    save_file(
        {k: v for k, v in tensors.items() if not k.endswith("lora_up.weight") or "mid_block" not in k}, str(broken)
    )
    with pytest.raises(AdapterError, match="is incomplete \\(has only alpha, lora_down.weight\\)"):
        read_for_base(broken, tiny_sd)
