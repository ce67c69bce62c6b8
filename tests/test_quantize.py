"""A quantized frozen base (QLoRA): what gets quantized, that adapters still learn, and the warnings when an
adapter trained on it is used on full-precision weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_cli.config.schema import ModelSection
from tests.conftest import fixed_batch_losses, run_command, train_preset


@pytest.fixture(scope="module")
def wide_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Flux with 64-wide layers (4-bit quantization takes layers whose widths are multiples of 64)."""
    from lora_cli.toy.tiny_dits import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("models") / "wide-flux", seed=0, heads=4)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_quantized_dit_base_still_learns(mode, write_preset, wide_flux: Path, shapes_data: Path) -> None:
    import bitsandbytes as bnb

    from lora_cli.models import load_base

    base = load_base(ModelSection(path=str(wide_flux), quantize=mode))
    report = base.pipeline_extras["quantization"]
    kind = bnb.nn.Linear8bitLt if mode == "int8" else bnb.nn.Linear4bit
    assert report.layers == sum(isinstance(m, kind) for m in base.denoiser.modules()) > 10
    assert report.quantized_parameters > 0.9 * report.total_parameters  # a DiT is nearly all Linear
    assert report.bytes_after < (0.35 if mode == "int8" else 0.25) * report.bytes_before  # from float32
    preset = write_preset(model={"path": str(wide_flux), "max_text_tokens": 32, "quantize": mode})
    before, after = fixed_batch_losses(preset, ["train.learning_rate=1e-2", "adapter.targets=full"], shapes_data)
    assert after < 0.8 * before, (before, after)


def test_unet_quantization_reports_that_convolutions_stay(tiny_sd: Path) -> None:
    from torch import nn

    from lora_cli.models import load_base

    base = load_base(ModelSection(path=str(tiny_sd), quantize="nf4"))
    report = base.pipeline_extras["quantization"]
    assert report.layers > 0 and report.quantized_parameters < 0.5 * report.total_parameters
    assert any(type(m) is nn.Conv2d for m in base.denoiser.modules())
    assert "convolutions and small layers stay as stored" in report.line()


def test_adapter_from_a_quantized_base_warns_when_used_on_full_precision(wide_flux, shapes_data, tmp_path) -> None:
    def trained(name: str, quantize: str) -> Path:
        raw = {
            "model": {"path": str(wide_flux), "max_text_tokens": 32, "quantize": quantize},
            "data": {"folder": str(shapes_data), "resolution": 64},
            "adapter": {"rank": 4, "alpha": 4},
            "train": {"steps": 2, "learning_rate": 1e-3, "batch_size": 2},
            "output": {"dir": str(tmp_path / name)},
        }
        return train_preset(raw, name)

    quantized, plain = trained("q", "nf4"), trained("plain", "none")
    merged = run_command("merge", str(wide_flux), str(quantized), str(tmp_path / "merged"))
    assert merged.returncode == 0 and "change less than their nf4 quantization error" in merged.stderr
    clean = run_command("merge", str(wide_flux), str(plain), str(tmp_path / "merged-plain"))
    assert clean.returncode == 0 and "quantization" not in clean.stderr

    def sample(out: str, *extra: str) -> tuple[np.ndarray, str]:
        args = ["--base", str(wide_flux), "--adapter", str(quantized), "--prompt", "a yellow star", "--size", "64"]
        result = run_command("sample", *args, "--steps", "2", "--out", str(tmp_path / out), *extra)
        assert result.returncode == 0, result.stderr
        return np.asarray(Image.open(next((tmp_path / out).glob("000-*.png"))), dtype=np.int16), result.stderr

    full, warned = sample("full")
    as_trained, quiet = sample("nf4", "--quantize", "nf4")
    assert "quantization error" in warned and "quantization error" not in quiet
    assert np.abs(full - as_trained).max() > 0  # the quantized base draws differently
    bad = run_command("sample", "--base", str(wide_flux), "--prompt", "a", "--quantize", "nf5")
    assert bad.returncode == 2 and "choose one of none, nf4, fp4, int8" in bad.stderr


def test_lycoris_algorithms_are_refused_on_a_quantized_base(write_preset) -> None:
    result = run_command("train", str(write_preset(model={"quantize": "nf4"}, adapter={"type": "loha"})))
    assert result.returncode == 2 and "trains lora or locon adapters only" in result.stderr


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_quantized_layers_answer_in_the_base_dtype_whatever_their_input(mode: str) -> None:
    """On CUDA, autocast runs LayerNorm in float32; a 4-bit layer fed that used to answer in float32 (bitsandbytes
    keeps its input's dtype), so float32 flowed on through a bf16 model. Now it answers in the compute dtype,
    as the nn.Linear it replaced does under autocast, and gives the same numbers as from a bf16 input."""
    import torch
    from torch import nn

    from lora_cli.models.quantize import quantize_linear_layers

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).to(torch.bfloat16)
    quantize_linear_layers(model, mode, torch.bfloat16)
    activations = torch.randn(3, 64)  # what a float32 LayerNorm hands on
    with torch.no_grad():
        output = model(activations)
        reference = model(activations.to(torch.bfloat16))
    assert output.dtype == torch.bfloat16
    assert torch.equal(output, reference)
