"""Training objectives: how clean latents become a noisy input, a model timestep, a target and loss weights.

`DenoisingObjective` is DDPM training (SD1.x/2, SDXL, PixArt): integer timesteps, the scheduler's noise
schedule, an epsilon / v / sample target, optional min-SNR weighting. `FlowMatchingObjective` is rectified
flow (SD3, Flux): a noise level sigma in (0, 1), input (1 - sigma) x + sigma n, velocity target n - x.
Every random draw uses the sample's own generator (see `BatchSample`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from lora_cli.diffusion.losses import min_snr_weights, prediction_target, sample_timesteps, snr

if TYPE_CHECKING:
    from collections.abc import Mapping

    from lora_cli.config.schema import FlowSection


@dataclass
class NoisedBatch:
    noisy: torch.Tensor
    timesteps: torch.Tensor  # what the objective calls time: integer steps (DDPM) or sigmas in (0, 1) (flow)
    target: torch.Tensor
    weights: torch.Tensor  # per-sample loss weights from the noise level (1 when there is no weighting)


class Objective(Protocol):
    def noised(self, latents: torch.Tensor, noise: torch.Tensor, generators: list[torch.Generator]) -> NoisedBatch: ...


class DenoisingObjective:
    def __init__(self, scheduler: Any, min_snr_gamma: float | None) -> None:
        self.scheduler, self.min_snr_gamma = scheduler, min_snr_gamma

    def noised(self, latents: torch.Tensor, noise: torch.Tensor, generators: list[torch.Generator]) -> NoisedBatch:
        count = self.scheduler.config.num_train_timesteps
        timesteps = torch.cat([sample_timesteps(1, count, g) for g in generators]).to(latents.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        prediction_type = self.scheduler.config.prediction_type
        target = prediction_target(prediction_type, self.scheduler, latents, noise, timesteps)
        weights = torch.ones(len(generators), device=latents.device)
        if self.min_snr_gamma is not None:
            ratio = snr(self.scheduler.alphas_cumprod, timesteps)
            weights = min_snr_weights(ratio, self.min_snr_gamma, prediction_type).to(latents.device)
        return NoisedBatch(noisy, timesteps, target, weights)


@dataclass(frozen=True)
class FlowMatchingObjective:
    settings: FlowSection
    shift: float  # 1.0 = no shift

    def noised(self, latents: torch.Tensor, noise: torch.Tensor, generators: list[torch.Generator]) -> NoisedBatch:
        sigmas = torch.cat([self._draw(g) for g in generators]).to(latents.device)
        sigmas = self.shift * sigmas / (1 + (self.shift - 1) * sigmas)
        view = sigmas.reshape(-1, *[1] * (latents.dim() - 1))
        noisy = (1 - view) * latents + view * noise
        return NoisedBatch(noisy, sigmas, noise - latents, flow_weights(sigmas, self.settings.weighting))

    def _draw(self, generator: torch.Generator) -> torch.Tensor:
        if self.settings.timesteps == "uniform":
            return torch.rand(1, generator=generator, device=generator.device)
        normal = torch.randn(1, generator=generator, device=generator.device)
        normal = normal * self.settings.logit_std + self.settings.logit_mean
        return torch.sigmoid(normal)


def flow_weights(sigmas: torch.Tensor, weighting: str) -> torch.Tensor:
    """Loss weights over noise levels (Esser et al. 2024, SD3 paper, section 3.1)."""
    if weighting == "sigma_sqrt":
        return sigmas.clamp(min=1e-4).pow(-2.0)
    if weighting == "cosmap":
        return 2.0 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    return torch.ones_like(sigmas)


def resolution_shift(image_tokens: int, scheduler_config: Mapping[str, Any]) -> float:
    """The resolution-dependent shift of Flux-style schedulers (`use_dynamic_shifting`): log-shift linear in
    the number of image tokens, from `base_shift` at `base_image_seq_len` tokens to `max_shift` at
    `max_image_seq_len` (the scheduler's values; FLUX.1's 0.5 at 256 to 1.15 at 4096 where it names none), as
    a multiplicative shift exp(mu)."""
    low, high = scheduler_config.get("base_image_seq_len") or 256, scheduler_config.get("max_image_seq_len") or 4096
    base_shift, max_shift = scheduler_config.get("base_shift") or 0.5, scheduler_config.get("max_shift") or 1.15
    slope = (max_shift - base_shift) / (high - low)
    return math.exp(base_shift + slope * (image_tokens - low))
