"""One way to open a base for every command: a folder, a single file, `builtin:NAME` and a hub id from the local
cache work alike for train, sample, merge, info, extract, resize, convert and plan."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_cli.builtin import builtin_path
from tests.conftest import invoke, train_preset


@pytest.fixture(scope="module")
def shapes_adapter(shapes_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quickstart's situation: an adapter trained on `builtin:shapes`."""
    folder = tmp_path_factory.mktemp("builtin-lora")
    raw = {
        "model": {"path": "builtin:shapes"},
        "data": {"folder": str(shapes_data), "resolution": 64},
        "adapter": {"rank": 4, "type": "locon", "text_encoder": True},
        "train": {"steps": 2, "learning_rate": 3e-2, "batch_size": 2},
        "output": {"dir": str(folder), "name": "star"},
    }
    return train_preset(raw, "star")


def test_every_toolbox_command_takes_builtin_bases(shapes_adapter: Path, tmp_path: Path) -> None:
    merged = invoke("merge", "builtin:shapes", str(shapes_adapter), str(tmp_path / "merged"))
    assert merged.returncode == 0, merged.stderr
    info = invoke("info", str(shapes_adapter), "--base", "builtin:shapes", "--json")
    fit = json.loads(info.stdout)["fit"]
    assert fit["fits"] and fit["same_base_as_training"] is True and fit["matched_layers"] > 0
    extracted = invoke("lowrank", "builtin:shapes", str(tmp_path / "merged"), str(tmp_path / "x.safetensors"),
                       "--rank", "8", entry="extract_main")  # fmt: skip
    assert extracted.returncode == 0 and "energy kept" in extracted.stdout, extracted.stderr
    resized = invoke("lowrank", str(shapes_adapter), str(tmp_path / "r.safetensors"), "--energy", "1.0", "--base",
                     "builtin:shapes", entry="resize_main")  # fmt: skip
    assert resized.returncode == 0, resized.stderr
    converted = invoke("convert", str(shapes_adapter), str(tmp_path / "d.safetensors"), "--to", "diffusers",
                       "--base", "builtin:shapes")  # fmt: skip
    assert converted.returncode == 0, converted.stderr
    unknown = invoke("merge", "builtin:nothing", str(shapes_adapter), str(tmp_path / "o"))
    assert unknown.returncode == 2 and "no built-in model `nothing`; available: shapes" in unknown.stderr


def test_hub_ids_resolve_from_the_local_cache_for_every_command(shapes_adapter: Path, tmp_path: Path) -> None:
    """A hub id that is in the Hugging Face cache works offline; one that is not says how to get it."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--shapes" / "snapshots" / "0123abcd"
    shutil.copytree(builtin_path("shapes"), snapshot)
    (cache / "models--someone--shapes" / "refs").mkdir()
    (cache / "models--someone--shapes" / "refs" / "main").write_text("0123abcd")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}

    def run(module: str, *args: str, entry: str = "main") -> subprocess.CompletedProcess:
        command = [sys.executable, "-c", f"from lora_cli.cli.{module} import {entry}; {entry}()", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)

    merged = run("merge", "someone/shapes", str(shapes_adapter), str(tmp_path / "merged"))
    assert merged.returncode == 0, merged.stderr
    same = load_file(str(tmp_path / "merged" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert same.keys() == load_file(str(snapshot / "unet" / "diffusion_pytorch_model.safetensors")).keys()
    info = run("info", str(shapes_adapter), "--base", "someone/shapes", "--json")
    assert json.loads(info.stdout)["fit"]["fits"], info.stderr
    missing = run("info", str(shapes_adapter), "--base", "someone/not-downloaded")
    assert missing.returncode == 2
    assert "cannot find hub model someone/not-downloaded locally or on the hub" in missing.stderr.splitlines()[-1]


def test_plan_takes_every_quantize_mode_the_schema_offers(write_preset) -> None:
    from lora_cli.models.quantize import CHOICES

    for mode in CHOICES:
        result = invoke("train", str(write_preset()), "--plan", "--set", f"model.quantize={mode}", "--set",
                        "adapter.type=lora")  # fmt: skip
        assert result.returncode == 0, (mode, result.stderr)
        assert f"quantize {mode}" in result.stdout


def test_kohya_text_encoder_adapter_converted_to_diffusers_loads_in_diffusers(
    tiny_sd: Path, shapes_data: Path, tmp_path: Path
) -> None:
    """A kohya UNet + text-encoder LoRA converted with --base: diffusers' loader takes every layer (no
    NoMatchingPeftModuleError), and `lora-info --base` matches what merge matches."""
    from tests.test_interop import assert_consumed, diffusers_pipeline

    raw = {
        "model": {"path": str(tiny_sd)},
        "data": {"folder": str(shapes_data), "resolution": 64},
        "adapter": {"rank": 4, "text_encoder": True},
        "train": {"steps": 1, "batch_size": 2},
        "output": {"dir": str(tmp_path / "run"), "name": "kohya", "format": "kohya"},
    }
    kohya = train_preset(raw, "kohya")
    bare = tmp_path / "bare.safetensors"
    from safetensors.torch import save_file

    save_file(load_file(str(kohya)), str(bare))  # as other trainers write it: no lora-cli metadata
    converted = tmp_path / "converted.safetensors"
    result = invoke("convert", str(bare), str(converted), "--to", "diffusers", "--base", str(tiny_sd))
    assert result.returncode == 0, result.stderr
    keys = load_file(str(converted))
    assert any(k.startswith("text_encoder.encoder.layers.") for k in keys)
    assert_consumed(diffusers_pipeline(tiny_sd), converted)
    fit = json.loads(invoke("info", str(converted), "--base", str(tiny_sd), "--json").stdout)["fit"]
    merged = invoke("merge", str(tiny_sd), str(converted), str(tmp_path / "merged"))
    assert fit["fits"] and f"merged {fit['matched_layers']} layers" in merged.stderr


@pytest.mark.parametrize("kind", ["flux", "sd3", "pixart", "wan"])
def test_convert_takes_dit_adapters_both_ways_exactly(kind, tiny_base, shapes_data, clips, tmp_path: Path) -> None:
    data = {"folder": str(clips), "frames": 5} if kind == "wan" else {"folder": str(shapes_data)}
    raw = {
        "model": {"path": str(tiny_base(kind)), "max_text_tokens": 16},
        "data": {**data, "resolution": 64},
        "adapter": {"rank": 4, "text_encoder": kind != "wan"},
        "train": {"steps": 1, "batch_size": 2},
        "output": {"dir": str(tmp_path / "run"), "name": kind},
    }
    adapter = train_preset(raw, kind)
    as_kohya, back = tmp_path / "k.safetensors", tmp_path / "d.safetensors"
    first = invoke("convert", str(adapter), str(as_kohya), "--to", "kohya")
    assert first.returncode == 0, first.stderr
    assert all(key.startswith("lora_") for key in load_file(str(as_kohya)))
    second = invoke("convert", str(as_kohya), str(back), "--to", "diffusers")
    assert second.returncode == 0, second.stderr
    original, returned = load_file(str(adapter)), load_file(str(back))
    assert original.keys() == returned.keys()
    assert all(torch.equal(original[k], returned[k]) for k in original)
