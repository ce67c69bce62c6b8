"""Single-file (original SD key layout) checkpoints: writing, reading, merging, checked against diffusers."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console
from safetensors.torch import load_file, save_file

from lora_cli.models.single_file_writer import write_single_file
from lora_cli.sampling.run import SampleRequest, run_sampling
from lora_cli.toolbox.merge import merge_adapters
from tests.conftest import base_weights, run_command, train_preset


@pytest.fixture(scope="module")
def sd2_style(tiny_sd: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny base with SD2's traits: an OpenCLIP-style (GELU) text encoder, linear attention projections,
    two layers per block, a first down block and a last up block without attention."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = tmp_path_factory.mktemp("sd2") / "base"
    shutil.copytree(tiny_sd, folder)
    torch.manual_seed(5)
    config = CLIPTextConfig.from_pretrained(tiny_sd / "text_encoder")
    config.hidden_act = "gelu"
    CLIPTextModel(config).save_pretrained(folder / "text_encoder")
    unet = dict(UNet2DConditionModel.load_config(tiny_sd / "unet"))
    unet.update(
        use_linear_projection=True,
        layers_per_block=2,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    )
    UNet2DConditionModel.from_config(unet).save_pretrained(folder / "unet")
    return folder


def diffusers_from_single_file(path: Path, config: Path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_single_file(
        str(path), config=str(config), safety_checker=None, requires_safety_checker=False
    )


def assert_same_weights(pipe, folder: Path) -> None:
    from diffusers import StableDiffusionPipeline

    reference = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    for component in ("unet", "vae", "text_encoder"):
        loaded, expected = getattr(pipe, component).state_dict(), getattr(reference, component).state_dict()
        assert loaded.keys() == expected.keys(), component
        different = [key for key in expected if not torch.equal(loaded[key], expected[key])]
        assert not different, (component, different[:3])


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_written_single_file_loads_in_diffusers_unchanged(style, tiny_sd: Path, sd2_style: Path, tmp_path) -> None:
    folder = tiny_sd if style == "sd1" else sd2_style
    single = tmp_path / "model.safetensors"
    write_single_file(folder, single, {})
    keys = load_file(str(single)).keys()
    encoder_key = "cond_stage_model.transformer.text_model" if style == "sd1" else "cond_stage_model.model.transformer"
    assert any(key.startswith(encoder_key) for key in keys)
    assert any(key.startswith("model.diffusion_model.input_blocks.") for key in keys)
    assert_same_weights(diffusers_from_single_file(single, folder), folder)  # diffusers' own converter agrees
    from_file, from_folder = base_weights(single), base_weights(folder)
    assert from_file.layout.family == style and from_file.adaptable_shapes() == from_folder.adaptable_shapes()
    checked = [key for key in from_folder.adaptable_shapes() if key[1].endswith(("proj_in", "v_proj", "conv_shortcut"))]
    assert len(checked) >= 3
    for key in checked:
        assert torch.equal(from_file.read_weight(key), from_folder.read_weight(key))


@pytest.fixture(scope="module")
def sd2_text_encoder_lora(sd2_style: Path, shapes_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA on the UNet and the text encoder's q/k/v (fused into one tensor in SD2 single files)."""
    folder = tmp_path_factory.mktemp("te-lora")
    raw = {
        "model": {"path": str(sd2_style)},
        "data": {"folder": str(shapes_data), "resolution": 64},
        "adapter": {"rank": 4, "alpha": 2, "text_encoder": True},
        "train": {"steps": 3, "learning_rate": 3e-2, "batch_size": 2},
        "output": {"dir": str(folder), "name": "te"},
    }
    return train_preset(raw, "te")


def test_merging_into_a_single_file_equals_merging_into_the_folder(
    sd2_style: Path, sd2_text_encoder_lora: Path, trained_adapters, tmp_path: Path
) -> None:
    single = tmp_path / "base.safetensors"
    write_single_file(sd2_style, single, {})
    adapters = [(sd2_text_encoder_lora, 0.7)]
    merged_folder = tmp_path / "merged"
    merge_adapters(sd2_style, adapters, merged_folder)
    result = merge_adapters(single, adapters, tmp_path / "merged.safetensors")
    from_folder_to_file = merge_adapters(sd2_style, adapters, tmp_path / "converted.safetensors")
    assert result.merged_layers == from_folder_to_file.merged_layers > 0
    merged = load_file(str(tmp_path / "merged.safetensors"))
    original = load_file(str(single))
    fused = [k for k in merged if k.endswith("attn.in_proj_weight") and not torch.equal(merged[k], original[k])]
    assert fused, "the text encoder's fused q/k/v tensors were not merged"
    converted = load_file(str(tmp_path / "converted.safetensors"))
    assert merged.keys() == converted.keys() and all(torch.equal(merged[k], converted[k]) for k in merged)
    assert_same_weights(diffusers_from_single_file(tmp_path / "merged.safetensors", sd2_style), merged_folder)


def test_merged_single_file_draws_what_base_plus_adapter_draws(tiny_sd: Path, trained_adapters, tmp_path) -> None:
    single = tmp_path / "base.safetensors"
    write_single_file(tiny_sd, single, {})
    merged = tmp_path / "merged.safetensors"
    result = run_command("merge", str(single), str(trained_adapters["locon"]), str(merged))
    assert result.returncode == 0, result.stderr
    console = Console(quiet=True)
    common = {"prompts": ["a yellow star"], "steps": 3, "size": 64, "seed": 3, "config": str(tiny_sd)}
    with_adapter = run_sampling(
        SampleRequest(base=str(single), out=tmp_path / "a", adapters=[(trained_adapters["locon"], 1.0)], **common),
        console,
    )
    from_merged = run_sampling(SampleRequest(base=str(merged), out=tmp_path / "b", **common), console)
    base_only = run_sampling(SampleRequest(base=str(single), out=tmp_path / "c", **common), console)
    a, b, c = (np.asarray(Image.open(paths[0]), dtype=np.int16) for paths in (with_adapter, from_merged, base_only))
    assert np.abs(a - b).max() <= 1  # same float32 weights; at most 8-bit rounding differs
    assert np.abs(a - c).max() > 10  # and the adapter does change the image


def test_variant_copies_and_old_buffers_in_a_folder_are_handled(tiny_sd: Path, tmp_path: Path) -> None:
    """A hub snapshot may hold `model.fp16.safetensors` beside `model.safetensors`, and text encoders saved by
    older transformers a `position_ids` buffer: the plain files are used, the buffer is not a weight."""
    folder = tmp_path / "snapshot"
    shutil.copytree(tiny_sd, folder)
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({k: v.half() for k, v in load_file(str(unet)).items()}, str(unet.with_suffix(".fp16.safetensors")))
    encoder = folder / "text_encoder" / "model.safetensors"
    tensors = load_file(str(encoder))
    save_file({**tensors, "embeddings.position_ids": torch.arange(16)[None]}, str(encoder))
    write_single_file(folder, tmp_path / "model.safetensors", {})
    assert_same_weights(diffusers_from_single_file(tmp_path / "model.safetensors", tiny_sd), tiny_sd)
    assert base_weights(folder).files["unet"] == [unet]


def test_single_file_errors(tiny_sd: Path, trained_adapters, tmp_path: Path) -> None:
    single = tmp_path / "base.safetensors"
    write_single_file(tiny_sd, single, {})
    other = tmp_path / "other.safetensors"
    save_file({"transformer.blocks.0.weight": torch.zeros(2, 2)}, str(other))
    lora = str(trained_adapters["lora"])
    cases = [
        ([str(single), lora, str(tmp_path / "folder-out")], "OUT must be a .safetensors file too"),
        ([str(other), lora, str(tmp_path / "o.safetensors")], "not a Stable Diffusion 1.x/2.x/XL single-file"),
    ]
    for args, message in cases:
        result = run_command("merge", *args)
        assert result.returncode == 2 and message in result.stderr.strip().splitlines()[-1], result.stderr
        assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "other.safetensors"]


def test_pickle_inputs_need_allow_pickle(tiny_sd: Path, trained_adapters, tmp_path: Path) -> None:
    single = tmp_path / "base.safetensors"
    write_single_file(tiny_sd, single, {})
    checkpoint = tmp_path / "base.ckpt"
    torch.save({"state_dict": load_file(str(single))}, checkpoint)
    adapter = tmp_path / "adapter.pt"
    torch.save(load_file(str(trained_adapters["lora"])), adapter)
    refused = run_command("merge", str(checkpoint), str(adapter), str(tmp_path / "a.safetensors"))
    assert refused.returncode == 2 and "--allow-pickle" in refused.stderr and "Traceback" not in refused.stderr
    allowed = run_command("merge", str(checkpoint), str(adapter), str(tmp_path / "b.safetensors"), "--allow-pickle")
    assert allowed.returncode == 0, allowed.stderr
    merge_adapters(single, [(trained_adapters["lora"], 1.0)], tmp_path / "c.safetensors")
    b, c = load_file(str(tmp_path / "b.safetensors")), load_file(str(tmp_path / "c.safetensors"))
    assert b.keys() == c.keys() and all(torch.equal(b[k], c[k]) for k in b)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "scratch files left behind"
    hostile = tmp_path / "hostile.pt"
    hostile.write_bytes(b"\x80\x04cos\nsystem\n(S'echo pwned'\ntR.")
    blocked = run_command("merge", str(single), str(hostile), str(tmp_path / "d.safetensors"), "--allow-pickle")
    assert blocked.returncode == 2 and "cannot be read as a plain tensor file" in blocked.stderr
