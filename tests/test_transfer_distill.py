"""`lora-transfer --method distill`: the source base with the adapter draws the images, the adapter's own preset
trains the replacement on the target to predict there what the source with the adapter predicts on them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.conftest import invoke
from tests.test_transfer import rewrite_unet

PROMPT = "a yellow star"


def distill(adapter: Path, source: Path, target: Path, out: Path, *options: str):
    command = [str(adapter), str(out), "--from", str(source), "--to", str(target), "--method", "distill", *options]
    return invoke("transfer", *command)


def predictions(base: Path, adapter: Path | None, images: list[Path]) -> torch.Tensor:
    """The base's (+ adapter's) noise predictions on `images` captioned PROMPT, noised with fixed noise at five
    timesteps."""
    from lora_cli.adapters.loading import load_adapter_file
    from lora_cli.config.schema import ModelSection
    from lora_cli.models import load_base

    loaded = load_base(ModelSection(path=str(base)))
    if adapter is not None:
        load_adapter_file(loaded.trainable_components(), loaded.architecture, adapter)
    pipeline = loaded.architecture.build_pipeline(loaded)
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(image).convert("RGB"))) for image in images])
    pixels = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1
    generator = torch.Generator().manual_seed(0)
    found = []
    with torch.no_grad():
        latents = pipeline.vae.encode(pixels).latent_dist.mean * pipeline.vae.config.scaling_factor
        embeddings = pipeline.encode_prompt(PROMPT, "cpu", len(images), False)[0]
        for step in (100, 300, 500, 700, 900):
            noisy = pipeline.scheduler.add_noise(
                latents, torch.randn(latents.shape, generator=generator), torch.tensor([step])
            )
            found.append(pipeline.unet(noisy, step, encoder_hidden_states=embeddings).sample)
    return torch.stack(found)


@pytest.fixture(scope="module")
def tuned(tiny_sd: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fine-tune of tiny_sd as a merged LoRA would make one: a rank-1 change of a fifth of each weight's norm in
    every attention projection."""
    generator = torch.Generator().manual_seed(5)

    def tune(name: str, value: torch.Tensor) -> torch.Tensor:
        if value.dim() != 2 or ".attn" not in name:
            return value
        change = torch.randn(value.shape[0], 1, generator=generator) @ torch.randn(
            1, value.shape[1], generator=generator
        )
        return value + 0.2 * value.norm() / change.norm() * change

    return rewrite_unet(tiny_sd, tmp_path_factory.mktemp("distill-target") / "tuned", tune)


@pytest.fixture(scope="module")
def distilled(trained_adapters: dict[str, Path], tiny_sd: Path, tuned: Path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("distill")
    (folder / "prompts.txt").write_text(f"{PROMPT}\n", encoding="utf-8")
    out = folder / "moved.safetensors"
    options = ("--prompts", str(folder / "prompts.txt"), "--images-per-prompt", "5", "--steps", "100")
    result = distill(trained_adapters["lora"], tiny_sd, tuned, out, *options)
    assert result.returncode == 0, result.stderr
    return out


def test_the_replacement_learns_on_the_target_what_the_adapter_drew(
    distilled: Path,
    trained_adapters: dict[str, Path],
    tiny_sd: Path,
    tuned: Path,
    tmp_path: Path,
) -> None:
    teacher = sorted((distilled.parent / "moved.transfer" / "teacher").glob("*/teacher_*.png"))
    assert len(teacher) == 5
    # The images are the source's with the adapter: lora-sample draws the same from the same seeds.
    drawn = invoke(
        "sample", "--base", str(tiny_sd), "--adapter", str(trained_adapters["lora"]), "--prompt", PROMPT,
        "--images", "5", "--seed", "5000", "--steps", "25", "--size", "64", "--out", str(tmp_path / "drawn"),
    )  # fmt: skip
    assert drawn.returncode == 0, drawn.stderr
    sampled = sorted(path for path in (tmp_path / "drawn").glob("*.png") if "grid" not in path.name)
    for mine, theirs in zip(teacher, sampled, strict=True):
        assert np.array_equal(np.asarray(Image.open(mine)), np.asarray(Image.open(theirs)))
    # On the target, the replacement predicts what the source with the adapter predicts on them, far closer than
    # the target alone or the target with the adapter as it is.
    wanted = predictions(tiny_sd, trained_adapters["lora"], teacher)
    alone, direct, replaced = (
        float((predictions(tuned, adapter, teacher) - wanted).norm())
        for adapter in (None, trained_adapters["lora"], distilled)
    )
    assert replaced < 0.5 * min(alone, direct), (replaced, alone, direct)


def test_the_replacement_records_both_bases_and_how_it_was_made(
    distilled: Path,
    tiny_sd: Path,
    tuned: Path,
) -> None:
    with safe_open(str(distilled), "pt") as handle:
        metadata = handle.metadata()
    record = json.loads(metadata["lora_cli.transferred_from"])
    assert record["method"] == "distill" and record["prompts"] == [PROMPT] and record["steps"] == 100
    assert record["source"] == str(tiny_sd) and record["target"] == str(tuned)
    assert record["source_fingerprint"] != record["target_fingerprint"] == metadata["lora_cli.base_fingerprint"]
    assert metadata["lora_cli.base_model"] == str(tuned)


def test_an_adapter_without_a_recorded_preset_needs_one(
    trained_adapters: dict[str, Path],
    tiny_sd: Path,
    tuned: Path,
    tmp_path: Path,
) -> None:
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(trained_adapters["lora"])), str(bare))
    result = distill(bare, tiny_sd, tuned, tmp_path / "out.safetensors")
    assert result.returncode == 2 and not (tmp_path / "out.safetensors").exists()
    assert "records no training preset" in result.stderr and "--preset" in result.stderr.strip().splitlines()[-1]


def test_options_of_the_other_methods_are_refused(
    trained_adapters: dict[str, Path],
    tiny_sd: Path,
    tuned: Path,
    tmp_path: Path,
) -> None:
    out = tmp_path / "out.safetensors"
    refused = distill(trained_adapters["lora"], tiny_sd, tuned, out, "--rank", "2")
    assert refused.returncode == 2 and "--rank is an option of --method rotate or project" in refused.stderr
    plain = ["transfer", str(trained_adapters["lora"]), str(out), "--from", str(tiny_sd), "--to", str(tiny_sd)]
    refused = invoke(*plain, "--steps", "3")
    assert refused.returncode == 2 and "--steps is an option of --method distill" in refused.stderr
    # The adapter's preset names no preview prompts of its own: what to draw must be given.
    missing = distill(trained_adapters["lora"], tiny_sd, tuned, out)
    assert missing.returncode == 2 and "give --prompts" in missing.stderr and not out.exists()
    (tmp_path / "prompts.txt").write_text(f"{PROMPT}\n", encoding="utf-8")
    few = distill(trained_adapters["lora"], tiny_sd, tuned, out, "--prompts", str(tmp_path / "prompts.txt"),
                  "--images-per-prompt", "4")  # fmt: skip
    assert few.returncode == 2 and "training needs at least 5" in few.stderr and not out.exists()


def test_the_transfer_objective_names_its_teacher(tiny_sd: Path, shapes_data: Path) -> None:
    from lora_cli.config import validate_preset
    from lora_cli.errors import PresetError

    raw = {"model": {"path": str(tiny_sd)}, "data": {"folder": str(shapes_data)}, "train": {"steps": 1}}
    with pytest.raises(PresetError, match="needs `transfer.source` and `transfer.adapter`"):
        validate_preset({**raw, "train": {"steps": 1, "objective": "transfer"}}, "p.yaml")
    with pytest.raises(PresetError, match="is for `train.objective: transfer`"):
        validate_preset({**raw, "transfer": {"source": str(tiny_sd)}}, "p.yaml")


def test_a_teacher_with_text_encoder_layers_is_refused(
    tiny_sd: Path, shapes_data: Path, tuned: Path, tmp_path: Path
) -> None:
    """The teacher is given the student's text conditioning, so its own text-encoder layers would be ignored."""
    from tests.conftest import train_preset

    raw = {
        "model": {"path": str(tiny_sd)},
        "data": {"folder": str(shapes_data), "resolution": 64},
        "adapter": {"rank": 2, "text_encoder": True},
        "train": {"steps": 1, "batch_size": 2},
        "sample": {"prompts": [PROMPT]},
        "output": {"dir": str(tmp_path / "run"), "name": "with-text"},
    }
    adapter = train_preset(raw, "with-text")
    out = tmp_path / "out.safetensors"
    result = distill(adapter, tiny_sd, tuned, out, "--images-per-prompt", "5", "--steps", "1")
    assert result.returncode == 2 and not out.exists()
    assert "has text-encoder layers" in result.stderr.strip().splitlines()[-1]
