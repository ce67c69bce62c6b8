"""Sampling schedulers by the names users know them by."""

from __future__ import annotations

from typing import Any

from lora_cli.errors import LoraCliError

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "pndm": "PNDMScheduler",
    "ddpm": "DDPMScheduler",
}


def make_scheduler(name: str, base_scheduler: Any) -> Any:
    """A scheduler of kind `name` with the base model's noise schedule ("default": the model's own)."""
    if name == "default":
        return base_scheduler
    if name not in SCHEDULERS:
        raise LoraCliError(f"--scheduler: unknown scheduler `{name}`; choose from default, {', '.join(SCHEDULERS)}")
    import diffusers

    return getattr(diffusers, SCHEDULERS[name]).from_config(base_scheduler.config)
