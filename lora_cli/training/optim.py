"""Optimizer and learning-rate schedule from the preset's `train` section."""

from __future__ import annotations

from typing import Any

import torch

from lora_cli.config.schema import TrainSection
from lora_cli.errors import PresetError


def build_optimizer(
    param_groups: list[dict[str, Any]], train: TrainSection, sharded: bool = False
) -> torch.optim.Optimizer:
    """AdamW (torch; fused unless `train.fused_optimizer: false` or sharded), AdamW8bit (bitsandbytes) or Prodigy,
    with `optimizer_args` passed through."""
    kwargs: dict[str, Any] = {"weight_decay": train.weight_decay, **train.optimizer_args}
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    if train.optimizer == "adamw":
        factory = torch.optim.AdamW
        fused = train.fused_optimizer if train.fused_optimizer is not None else not sharded
        kwargs.setdefault("fused" if fused else "foreach", True)
    elif train.optimizer == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise PresetError(
                "train.optimizer: adamw8bit needs bitsandbytes; install it with `pip install lora-cli[bnb]`"
            ) from None
        factory = bitsandbytes.optim.AdamW8bit
    else:
        from prodigyopt import Prodigy

        factory = Prodigy
    try:
        return factory(param_groups, **kwargs)
    except (TypeError, ValueError) as exc:
        raise PresetError(f"train.optimizer_args: {train.optimizer} rejects them ({exc})") from None


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainSection, total_steps: int) -> Any:
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        train.scheduler,
        optimizer=optimizer,
        num_warmup_steps=train.warmup_steps,
        num_training_steps=total_steps,
    )
