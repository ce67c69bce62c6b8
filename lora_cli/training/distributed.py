"""Checks that only matter when several processes train together (DDP through accelerate/torchrun)."""

from __future__ import annotations

import torch

from lora_cli.errors import LoraCliError
from lora_cli.training.session import TrainingSession


def check_processes_agree(session: TrainingSession) -> None:
    """Every process must end with the same adapter weights (DDP averages gradients, so they stay equal);
    a difference means a broken setup, and writing rank 0's adapter would hide it."""
    accelerator = session.accelerator
    if accelerator.num_processes == 1:
        return
    parameters = [p.detach().double().flatten() for name in session.adapter.components
                  for p in session.adapter.parameters(name)]  # fmt: skip
    flat = torch.cat(parameters)
    positions = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
    digest = torch.stack([flat.sum(), (flat * positions).sum(), flat.abs().max()]).to(accelerator.device)
    gathered = accelerator.gather(digest[None]).reshape(accelerator.num_processes, -1)
    if not all(torch.equal(row, gathered[0]) for row in gathered):
        raise LoraCliError(
            "the processes ended with different adapter weights; check that every process runs the same "
            "lora-cli version, preset and data (and report it if they do)"
        )
