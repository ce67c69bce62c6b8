"""Sampling schedulers by the names users know them by, and the sampler a distilled adapter is made for."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
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
    "lcm": "LCMScheduler",
}
FEW_STEP_DEFAULTS = {"lcm": (4, 1.0)}  # scheduler -> (steps, guidance scale) when the user gives neither
SAMPLER_KEY = "lora_cli.sampler"  # adapter metadata: the sampler a distilled adapter is made for


@dataclass(frozen=True)
class Sampler:
    """A scheduler ("default": the base's own) with the steps and guidance scale it is drawn with (None: the
    pipeline's defaults) and, for LCM, the teacher solver's timestep count (`original_inference_steps`). A
    distilled adapter records the one it is made for."""

    scheduler: str
    steps: int | None = None
    guidance_scale: float | None = None
    solver_steps: int | None = None

    def to_metadata(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> Sampler | None:
        """The recorded sampler, or None when there is none or it cannot be read (it is advice, not a must)."""
        try:
            found = json.loads(metadata[SAMPLER_KEY])
            sampler = cls(str(found["scheduler"]), int(found["steps"]), float(found["guidance_scale"]),
                          None if found.get("solver_steps") is None else int(found["solver_steps"]))  # fmt: skip
        except (KeyError, TypeError, ValueError, json.JSONDecodeError):
            return None
        known = sampler.scheduler in SCHEDULERS or sampler.scheduler == "default"
        return sampler if known and sampler.steps > 0 and sampler.guidance_scale >= 0 else None


def make_scheduler(name: str, base_scheduler: Any, solver_steps: int | None = None) -> Any:
    """A scheduler of kind `name` with the base model's noise schedule ("default": the model's own); LCM's
    timesteps follow a teacher solver of `solver_steps` steps when given."""
    if name == "default":
        return base_scheduler
    if name not in SCHEDULERS:
        raise LoraCliError(f"--scheduler: unknown scheduler `{name}`; choose from default, {', '.join(SCHEDULERS)}")
    import diffusers

    options = {"original_inference_steps": solver_steps} if name == "lcm" and solver_steps else {}
    return getattr(diffusers, SCHEDULERS[name]).from_config(base_scheduler.config, **options)
