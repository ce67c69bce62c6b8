"""Every algorithm on Linear and Conv2d layers, float32 and bfloat16: peft's bypass forward equals our
independent merged weight (alpha != rank), merge/unmerge restores the base, and files round-trip exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_cli.adapters.catalog import ModuleCatalog
from lora_cli.adapters.files import read_adapter, write_adapter
from lora_cli.adapters.functional import merged_weight
from lora_cli.adapters.injection import InjectedAdapter, inject_spec
from lora_cli.adapters.loading import inject_adapter_file
from lora_cli.adapters.registry import AdapterSpec
from lora_cli.models.stable_diffusion import StableDiffusion

ARCHITECTURE = StableDiffusion()  # its UNet's kohya names: `lora_unet_` + the module path
CASES = [
    ("lora", False),
    ("locon", False),
    ("lora", True),  # DoRA
    ("loha", False),
    ("lokr", False),
]
# (rank, alpha): small layers make LoKr use two full factors; rank 2 on the wide layer factorises w2.
SHAPES = {"linear": (4, 3.0), "conv": (4, 3.0)}
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


class Layers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(48, 40)
        self.conv = nn.Conv2d(16, 24, 3, padding=1)
        self.wide = nn.Linear(256, 256)


def adapted(algorithm: str, dora: bool, dtype: torch.dtype, rank: int = 4, alpha: float = 3.0) -> InjectedAdapter:
    torch.manual_seed(0)
    model = Layers().to(dtype).requires_grad_(False)
    spec = AdapterSpec(algorithm, rank, alpha, dora=dora, rank_pattern={"wide": 2}, alpha_pattern={"wide": 5.0})
    adapter = inject_spec({"unet": model}, spec, {"unet": ["linear", "conv", "wide"]}, seed=0)
    generator = torch.Generator().manual_seed(1)
    for param in adapter.parameters("unet"):  # trained-looking weights (peft initialises the update to zero)
        param.data = 0.2 * torch.randn(param.shape, generator=generator)
        if param.dim() == 1 or param.shape[0] == 1:  # DoRA magnitudes stay positive
            param.data = param.data.abs() + 0.5
    return adapter


def inputs(name: str, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    shape = {"linear": (5, 48), "conv": (2, 16, 8, 8), "wide": (3, 256)}[name]
    return torch.randn(shape, generator=generator).to(dtype)


def plain_forward(layer: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    bias = layer.bias.float() if layer.bias is not None else None
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x.float(), weight, bias, padding=layer.padding)
    return F.linear(x.float(), weight, bias)


def exported(adapter: InjectedAdapter, tmp_path: Path) -> dict:
    path = tmp_path / "adapter.safetensors"
    write_adapter(path, adapter.tensors(), adapter.ranks(), adapter.algorithm, "kohya", ARCHITECTURE, {})
    file = read_adapter(path, ModuleCatalog.from_components(ARCHITECTURE, {"unet": Layers()}))
    assert file.algorithm.name == ("lora" if adapter.algorithm.name == "locon" else adapter.algorithm.name)
    return {module: named for (_, module), named in file.tensors.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("algorithm", "dora"), CASES, ids=["lora", "locon", "dora", "loha", "lokr"])
def test_bypass_equals_independently_merged_weight(algorithm, dora, dtype, tmp_path: Path) -> None:
    adapter = adapted(algorithm, dora, dtype)
    files = exported(adapter, tmp_path)
    model = adapter.components["unet"].eval()
    for name in ("linear", "conv", "wide"):
        layer = model.get_submodule(name)
        x = inputs(name, dtype)
        with torch.no_grad():
            bypass = layer(x).float()
            merged = plain_forward(layer.get_base_layer(), merged_weight(layer.get_base_layer().weight, files[name]), x)
        scale = merged.abs().max().item()
        assert (bypass - merged).abs().max().item() <= TOLERANCE[dtype] * max(1.0, scale), name
        assert (
            merged - plain_forward(layer.get_base_layer(), layer.get_base_layer().weight.float(), x)
        ).abs().max() > 1e-2


@pytest.mark.parametrize(("algorithm", "dora"), CASES, ids=["lora", "locon", "dora", "loha", "lokr"])
def test_merge_then_unmerge_restores_the_base(algorithm, dora) -> None:
    adapter = adapted(algorithm, dora, torch.float32)
    model = adapter.components["unet"].eval()
    for name in ("linear", "conv", "wide"):
        layer = model.get_submodule(name)
        original = layer.get_base_layer().weight.detach().clone()
        x = inputs(name, torch.float32)
        with torch.no_grad():
            bypass = layer(x)
            layer.merge()
            assert not torch.equal(layer.get_base_layer().weight, original)
            torch.testing.assert_close(layer(x), bypass, rtol=1e-5, atol=1e-5)
            layer.unmerge()
        torch.testing.assert_close(layer.get_base_layer().weight, original, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("algorithm", "dora"), CASES, ids=["lora", "locon", "dora", "loha", "lokr"])
def test_save_then_load_reproduces_outputs(algorithm, dora, tmp_path: Path) -> None:
    adapter = adapted(algorithm, dora, torch.float32)
    path = tmp_path / "adapter.safetensors"
    write_adapter(path, adapter.tensors(), adapter.ranks(), adapter.algorithm, "kohya", ARCHITECTURE, {})
    torch.manual_seed(0)
    components = {"unet": Layers().requires_grad_(False)}
    file = read_adapter(path, ModuleCatalog.from_components(ARCHITECTURE, components))
    loaded = inject_adapter_file(components, file)
    trained = adapter.components["unet"].eval()
    for name in ("linear", "conv", "wide"):
        x = inputs(name, torch.float32)
        with torch.no_grad():
            expected, got = trained.get_submodule(name)(x), loaded.components["unet"].get_submodule(name)(x)
        if algorithm == "lokr" and name != "wide":
            # Two full Kronecker factors: the file folds alpha / r into w2 (what ComfyUI expects), so the
            # product is rounded differently.
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(got, expected), name
