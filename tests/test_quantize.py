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


@pytest.mark.parametrize("mode", ["nf4", "fp8"])
def test_adapter_from_a_quantized_base_warns_when_used_on_full_precision(mode, wide_flux, shapes_data, tmp_path):
    def trained(name: str, quantize: str) -> Path:
        raw = {
            "model": {"path": str(wide_flux), "max_text_tokens": 32, "quantize": quantize},
            "data": {"folder": str(shapes_data), "resolution": 64},
            "adapter": {"rank": 4, "alpha": 4},
            "train": {"steps": 2, "learning_rate": 1e-3, "batch_size": 2},
            "output": {"dir": str(tmp_path / name)},
        }
        return train_preset(raw, name)

    quantized, plain = trained("q", mode), trained("plain", "none")
    merged = run_command("merge", str(wide_flux), str(quantized), str(tmp_path / "merged"))
    assert merged.returncode == 0 and f"change less than their {mode} quantization error" in merged.stderr
    clean = run_command("merge", str(wide_flux), str(plain), str(tmp_path / "merged-plain"))
    assert clean.returncode == 0 and "quantization" not in clean.stderr

    def sample(out: str, *extra: str) -> tuple[np.ndarray, str]:
        args = ["--base", str(wide_flux), "--adapter", str(quantized), "--prompt", "a yellow star", "--size", "64"]
        result = run_command("sample", *args, "--steps", "2", "--out", str(tmp_path / out), *extra)
        assert result.returncode == 0, result.stderr
        return np.asarray(Image.open(next((tmp_path / out).glob("000-*.png"))), dtype=np.int16), result.stderr

    full, warned = sample("full")
    as_trained, quiet = sample(mode, "--quantize", mode)
    assert "quantization error" in warned and "quantization error" not in quiet
    assert np.abs(full - as_trained).max() > 0  # the quantized base draws differently
    bad = run_command("sample", "--base", str(wide_flux), "--prompt", "a", "--quantize", "nf5")
    assert bad.returncode == 2 and "choose one of none, fp8, nf4, fp4, int8" in bad.stderr


def test_lycoris_algorithms_are_refused_on_a_bitsandbytes_base(write_preset) -> None:
    result = run_command("train", str(write_preset(model={"quantize": "nf4"}, adapter={"type": "loha"})))
    assert result.returncode == 2 and "trains lora or locon adapters only" in result.stderr
    assert "quantize: fp8 (every algorithm)" in result.stderr


def test_fp8_layers_are_within_their_documented_tolerance_of_bf16() -> None:
    """fp8 keeps 3 mantissa bits: a layer's output is within 4% (relative Frobenius norm) of the bf16 layer's on
    Gaussian weights and inputs (2.4-2.7% measured), and moving or casting the model keeps the bytes fp8."""
    import torch
    from torch import nn

    from lora_cli.models.float8 import Float8Linear
    from lora_cli.models.quantize import quantize_linear_layers

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 256), nn.GELU(), nn.Linear(256, 80)).to(torch.bfloat16)
    reference = [layer.weight.detach().clone() for layer in (model[0], model[2])]
    inputs = torch.randn(16, 96, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = model(inputs).float()
        report = quantize_linear_layers(model, "fp8", torch.bfloat16)
        actual = model(inputs).float()
    assert report.layers == 2 and all(isinstance(model[i], Float8Linear) for i in (0, 2))
    assert report.bytes_after < 0.55 * report.bytes_before  # one byte instead of two, plus scales and biases
    assert (actual - expected).norm() / expected.norm() < 0.04
    for layer, weight in zip((model[0], model[2]), reference, strict=True):
        error = (layer.weight.float() - weight.float()).norm() / weight.float().norm()
        assert 0 < error < 0.04
    model.to(torch.float32)
    assert model[0].weight_fp8.dtype == torch.uint8 and model[0].weight.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_fp8_layer_keeps_only_its_bytes_for_backward(dtype: str) -> None:
    """What autograd keeps between forward and backward for an fp8 layer is its float8 bytes and scales, never
    the upcast weight (which would make an fp8 base cost more memory than a bf16 one), and the input's gradient
    equals the one through the upcast weight exactly."""
    import torch
    from torch import nn

    from lora_cli.models.float8 import Float8Linear

    compute = getattr(torch, dtype)
    torch.manual_seed(0)
    layer = Float8Linear(nn.Linear(96, 160).to(compute), compute)
    x = torch.randn(4, 7, 96, dtype=compute, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    assert not any(t.shape == (160, 96) and t.dtype == compute for t in saved)
    assert sum(t.numel() * t.element_size() for t in saved if t is not x) <= 160 * 96 + 4 * 160
    grad = torch.randn_like(out)
    (actual,) = torch.autograd.grad(out, x, grad)
    reference_input = x.detach().clone().requires_grad_(True)
    reference = torch.nn.functional.linear(reference_input, layer.weight, layer.bias)
    (expected,) = torch.autograd.grad(reference, reference_input, grad)
    assert torch.equal(out, reference) and torch.equal(actual, expected)


def test_a_4bit_layer_keeps_its_bytes_for_backward_only_through_saved_tensors() -> None:
    """bitsandbytes' own 4-bit matmul keeps the packed weight as a plain attribute of its autograd context, out of
    gradient checkpointing's reach, so offloaded blocks' device copies stayed referenced until backward. The
    layer lora-cli builds passes them through saved tensors only (a checkpoint-style hook that keeps nothing
    leaves the packed bytes unreferenced), and the input's gradient is the one through the dequantized weight."""
    import torch
    from bitsandbytes import functional as bnb_functional
    from torch import nn

    from lora_cli.models.four_bit import TrainableLinear4bit
    from lora_cli.models.quantize import quantize_linear_layers

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 192)).to(torch.bfloat16)
    quantize_linear_layers(model, "nf4", torch.bfloat16)
    layer = model[0]
    assert isinstance(layer, TrainableLinear4bit)
    storage = layer.weight.untyped_storage()
    references = torch._C._storage_Use_Count(storage._cdata)
    x = torch.randn(4, 128, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: None, lambda t: t):
        out = layer(x)
    assert torch._C._storage_Use_Count(storage._cdata) == references
    del out
    out = layer(x)
    weight = bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
    reference_input = x.detach().clone().requires_grad_(True)
    reference = nn.functional.linear(reference_input, weight, layer.bias)
    grad = torch.randn_like(out)
    (actual,), (expected,) = torch.autograd.grad(out, x, grad), torch.autograd.grad(reference, reference_input, grad)
    assert torch.equal(out, reference) and torch.equal(actual, expected)


@pytest.mark.parametrize("mode", ["fp8", "nf4"])
def test_quantizing_on_a_work_device_stores_the_same_bytes(mode: str) -> None:
    """The path a GPU machine takes (each layer quantized on the GPU, its bytes back on the host), with the CPU as
    the work device: the same stored tensors as quantizing in place (tests/test_device_moves.py takes it with
    CUDA on a GPU machine)."""
    import torch
    from torch import nn

    from lora_cli.models.quantize import quantize_linear_layers

    models = []
    for work_device in (None, torch.device("cpu")):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(128, 192), nn.GELU(), nn.Linear(192, 64)).to(torch.bfloat16)
        quantize_linear_layers(model, mode, torch.bfloat16, work_device)
        models.append([*model.parameters(), *model.buffers()])
    assert all(torch.equal(a, b) for a, b in zip(*models, strict=True))


def test_a_quantized_denoiser_lets_go_of_its_memory_mapped_file(wide_flux: Path) -> None:
    """diffusers memory-maps a file stored in the requested dtype; once the denoiser is quantized no tensor may
    point into that mapping, or every page quantizing read stays resident beside the quantized copy."""
    import gc

    import torch

    from lora_cli.models import load_base

    file = next((wide_flux / "transformer").glob("*.safetensors")).resolve()
    resident = load_base(ModelSection(path=str(wide_flux)))
    assert str(file) in Path("/proc/self/maps").read_text()  # the check below can fail: the file is mapped
    del resident
    gc.collect()
    base = load_base(ModelSection(path=str(wide_flux), quantize="fp8"))
    gc.collect()
    assert str(file) not in Path("/proc/self/maps").read_text()
    assert any(buffer.dtype == torch.uint8 for buffer in base.denoiser.buffers())  # still the fp8 model


def test_the_full_precision_denoiser_is_read_from_its_file_where_the_planner_says(wide_flux: Path) -> None:
    """Quantizing reads the denoiser's full-precision weights as loaded. Stored in `model.dtype` (this float32
    file), diffusers leaves them in the file's memory mapping, so the plan counts them as file pages (resident,
    but dropped by the kernel when RAM runs short); in another dtype they are a converted copy that must fit."""
    from lora_cli.config.schema import AdapterSection
    from lora_cli.models import load_base
    from lora_cli.planning import PlanSettings, estimate_memory, read_inventory
    from lora_cli.planning.estimate import CUDA_RUNTIME_RAM
    from lora_cli.planning.stored import StoredWeights

    file = str(next((wide_flux / "transformer").glob("*.safetensors")).resolve())
    inventory = read_inventory(ModelSection(path=str(wide_flux)))
    for dtype, from_file in (("float32", True), ("bfloat16", False)):
        base = load_base(ModelSection(path=str(wide_flux), dtype=dtype))
        ranges = [
            [int(address, 16) for address in line.split()[0].split("-")]
            for line in Path("/proc/self/maps").read_text().splitlines()
            if line.endswith(file)
        ]
        weights = [m.weight for m in base.denoiser.modules() if type(m).__name__ == "Linear"]
        mapped = [any(start <= w.data_ptr() < end for start, end in ranges) for w in weights]
        assert weights and all(mapped) if from_file else not any(mapped)
        settings = PlanSettings(adapter=AdapterSection(), quantize="fp8", dtype=dtype)
        plan = estimate_memory(inventory, settings, "cuda")
        full = StoredWeights(inventory, settings, "transformer").component_bytes("transformer", quantize=False)
        if from_file:  # resident while quantizing reads it, not part of what must fit
            assert plan.peak_resident_bytes - plan.peak_ram_bytes >= full
        else:  # a converted copy (like every component here): needed, and no file pages at all
            assert plan.peak_ram_bytes == plan.peak_resident_bytes >= CUDA_RUNTIME_RAM + full
        del base


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr", "dora"])
def test_an_fp8_base_trains_every_algorithm(kind, write_preset, wide_flux: Path, shapes_data: Path) -> None:
    adapter = {"type": "lora", "dora": True} if kind == "dora" else {"type": kind}
    preset = write_preset(model={"path": str(wide_flux), "max_text_tokens": 32, "quantize": "fp8"}, adapter=adapter)
    before, after = fixed_batch_losses(preset, ["train.learning_rate=1e-2", "adapter.targets=full"], shapes_data)
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("mode", ["fp8", "nf4"])
def test_the_planner_counts_what_a_quantized_base_holds(mode: str, wide_flux: Path) -> None:
    """What the planner counts for the denoiser's weights is what the loaded model holds: fp8 bytes and scales,
    or nf4's packed bytes with their double-quantized statistics (uint8 absmax, float32 absmax of those)."""
    import torch

    from lora_cli.config.schema import AdapterSection
    from lora_cli.models import load_base
    from lora_cli.planning import PlanSettings, estimate_memory, read_inventory

    base = load_base(ModelSection(path=str(wide_flux), quantize=mode))
    tensors = [*base.denoiser.parameters(), *base.denoiser.buffers()]
    for weight in base.denoiser.parameters():
        state = getattr(weight, "quant_state", None)
        if state is not None:
            tensors += [state.absmax, state.state2.absmax, state.offset]
    held = sum(t.numel() * t.element_size() for t in tensors)
    assert any(t.dtype == torch.uint8 for t in tensors)
    settings = PlanSettings(adapter=AdapterSection(), resolution=64, quantize=mode)
    plan = estimate_memory(read_inventory(ModelSection(path=str(wide_flux))), settings, "cuda")
    planned = next(part.bytes for part in plan.device_parts if part.name == "weights: transformer")
    assert planned == pytest.approx(held, rel=0.01)


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
