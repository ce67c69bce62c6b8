"""What moving quantized and offloaded weights between host and device must keep: layers quantized on the device
match the host's, an int8 base loaded for the device runs there, offloaded quantized blocks train as resident
ones and leave the device. On a GPU machine (`pytest -m gpu tests/test_device_moves.py`, under a minute) the
device is CUDA and the moves are real; elsewhere the CPU stands in for it, which checks the bookkeeping only."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lora_cli.models.quantize import quantize_linear_layers
from lora_cli.training.offload import BlockOffloader
from tests.test_offload import Checkpointed

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def blocks(count: int = 1, seed: int = 0) -> nn.ModuleList:
    torch.manual_seed(seed)
    made = (nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128)) for _ in range(count))
    return nn.ModuleList(made).to(torch.bfloat16).requires_grad_(False)


@pytest.mark.parametrize("mode", ["fp8", "nf4"])
def test_layers_quantized_on_the_gpu_come_back_as_the_cpu_makes_them(mode: str) -> None:
    """What `load_base` does on a GPU machine: each layer quantized on the GPU, its bytes back on the host."""
    on_cpu, on_gpu = blocks(), blocks()
    quantize_linear_layers(on_cpu, mode, torch.bfloat16)
    quantize_linear_layers(on_gpu, mode, torch.bfloat16, CUDA)
    assert all(t.device.type == "cpu" for t in [*on_gpu.parameters(), *on_gpu.buffers()])
    inputs = torch.randn(8, 128, dtype=torch.bfloat16, device=CUDA)
    with torch.no_grad():
        expected, actual = on_cpu.to(CUDA)[0](inputs).float(), on_gpu.to(CUDA)[0](inputs).float()
    assert (actual - expected).norm() / expected.norm() < 1e-2


def test_an_int8_base_loaded_for_the_gpu_runs_there() -> None:
    """As `load_base` does on a GPU machine: the int8 layers are left for bitsandbytes to quantize when the model
    moves to the GPU (a weight quantized on the host would arrive without its statistics)."""
    reference, model = blocks(), blocks()
    quantize_linear_layers(model, "int8", torch.bfloat16, CUDA)
    inputs = torch.randn(8, 128, dtype=torch.bfloat16, device=CUDA)
    with torch.no_grad():
        expected = reference.to(CUDA)[0](inputs).float()
        actual = model.to(CUDA)[0](inputs).float()
    assert (actual - expected).norm() / expected.norm() < 0.05


@pytest.mark.parametrize("mode", ["none", "fp8", "nf4"])
def test_offloaded_quantized_blocks_train_as_resident_ones_and_leave_the_gpu(mode: str) -> None:
    """As the session does it: quantized on the host, the offloader built there, then the model moved to the GPU.
    Adapter gradients equal a resident run's, and after the step only the last block used is on the GPU."""
    host = blocks(4)
    if mode != "none":
        quantize_linear_layers(host, mode, torch.bfloat16)
    resident, offloaded = copy.deepcopy(host).to(CUDA), copy.deepcopy(host)
    adapters = nn.ModuleList(nn.Linear(128, 256, bias=False) for _ in range(4)).to(CUDA, torch.bfloat16)
    for model in (resident, offloaded):
        for block, adapter in zip(model, adapters, strict=True):
            block[0].register_forward_hook(lambda _m, args, out, a=adapter: out + a(args[0]))
    inputs = torch.randn(4, 128, dtype=torch.bfloat16, device=CUDA)
    Checkpointed(resident)(inputs).float().square().sum().backward()
    expected = [adapter.weight.grad.clone() for adapter in adapters]
    adapters.zero_grad()

    offloader = BlockOffloader(list(offloaded[1:]), CUDA)
    offloaded.to(CUDA)
    Checkpointed(offloaded)(inputs).float().square().sum().backward()
    for adapter, grad in zip(adapters, expected, strict=True):
        torch.testing.assert_close(adapter.weight.grad, grad)
    assert offloader.on_device(0) and not offloader.on_device(1) and not offloader.on_device(2)
    held = sum(t.numel() * t.element_size() for t in [*offloaded[1:].parameters(), *offloaded[1:].buffers()])
    assert held == offloader.host_bytes // 3  # the first offloaded block's, used last in backward
