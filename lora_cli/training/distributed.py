"""What only matters when several processes train together (DDP or FSDP through accelerate/torchrun)."""

from __future__ import annotations

import os

import torch

from lora_cli.adapters.injection import AdapterTensors
from lora_cli.errors import LoraCliError
from lora_cli.training.session import TrainingSession


def launch_rank() -> int:
    """This process's rank as the launcher (torchrun, accelerate launch) set it, before any process group exists."""
    return int(os.environ.get("RANK", "0"))


def average_text_encoder_gradients(session: TrainingSession) -> None:
    """Average the text-encoder adapter's gradients over the processes. Only the denoiser is wrapped (DDP) or
    sharded (FSDP), so these gradients are not synchronised by a wrapper; one all-reduce covers them all."""
    accelerator = session.accelerator
    encoders = [name for name in session.adapter.components if name != session.base.architecture.denoiser_name]
    parameters = [p for name in encoders for p in session.adapter.parameters(name)]
    if accelerator.num_processes == 1 or not parameters:
        return
    gradients = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = accelerator.reduce(torch.cat([g.flatten() for g in gradients]), reduction="mean")
    for parameter, averaged in zip(parameters, flat.split([p.numel() for p in parameters]), strict=True):
        parameter.grad = averaged.view_as(parameter).clone()


def check_processes_agree(session: TrainingSession, tensors: AdapterTensors) -> None:
    """Every process must end with the same adapter weights (gradients are averaged, so they stay equal);
    a difference means a broken setup, and writing rank 0's adapter would hide it. `tensors` are the full
    (gathered) weights."""
    accelerator = session.accelerator
    if accelerator.num_processes == 1:
        return
    device = accelerator.device  # the weights are there; `alpha` values are made on the CPU
    flat = torch.cat([tensors[key][name].detach().to(device, torch.float64).flatten() for key in sorted(tensors)
                      for name in sorted(tensors[key])])  # fmt: skip
    positions = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=device)
    digest = torch.stack([flat.sum(), (flat * positions).sum(), flat.abs().max()])
    gathered = accelerator.gather(digest[None]).reshape(accelerator.num_processes, -1)
    if not all(torch.equal(row, gathered[0]) for row in gathered):
        raise LoraCliError(
            "the processes ended with different adapter weights; check that every process runs the same "
            "lora-cli version, preset and data (and report it if they do)"
        )
