"""Latent consistency distillation's pieces for DDPM bases (Luo et al. 2023, LCM, arXiv:2310.04378; LCM-LoRA,
arXiv:2311.05556): the teacher's skipping-step DDIM solver, the consistency boundary conditions, and conversions
between a prediction type and the clean sample / noise it implies.

The solver's timesteps are those diffusers' `LCMScheduler` samples from with `original_inference_steps` equal to
`solver_steps` (k = T / solver_steps; t = k, 2k, ..., T, minus one), and the boundary scalings are its own
(sigma_data 0.5, timestep scaling 10), so an adapter trained here draws with that scheduler unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0


@dataclass(frozen=True)
class SkippingSolver:
    """A DDIM solver over every k-th training timestep: one step goes from `timesteps[i]` to `timesteps[i] - k`."""

    alphas_cumprod: torch.Tensor  # the base scheduler's, float32
    timesteps: torch.Tensor  # the solver's start timesteps, ascending
    skip: int

    @classmethod
    def for_scheduler(cls, alphas_cumprod: torch.Tensor, solver_steps: int) -> SkippingSolver:
        total = len(alphas_cumprod)
        skip = total // solver_steps
        timesteps = torch.arange(1, solver_steps + 1) * skip - 1
        return cls(alphas_cumprod.float(), timesteps, skip)

    def draw(self, generator: torch.Generator) -> torch.Tensor:
        """One start timestep, uniformly over the solver's, on the generator's device."""
        index = torch.randint(0, len(self.timesteps), (1,), generator=generator, device=generator.device)
        return self.timesteps.to(generator.device)[index]

    def previous(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Where one solver step lands (0 at the end of the chain)."""
        return (timesteps - self.skip).clamp(min=0)

    def scales(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(alpha_bar), sqrt(1 - alpha_bar)) at the timesteps, shaped to broadcast over `like`."""
        alpha_bar = self.alphas_cumprod.to(timesteps.device)[timesteps]
        shape = (-1, *[1] * (like.dim() - 1))
        return alpha_bar.sqrt().reshape(shape), (1 - alpha_bar).sqrt().reshape(shape)

    def step(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The DDIM update to the previous solver timestep, from the clean sample and noise predicted at the start."""
        alpha, sigma = self.scales(self.previous(timesteps), x0)
        return alpha * x0 + sigma * noise


def boundary_scalings(timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """c_skip and c_out of the consistency parametrisation f(x, t) = c_skip x + c_out x0(x, t): at t = 0, c_skip
    is 1 and c_out 0, so the function is the identity there."""
    scaled = timesteps.float() * TIMESTEP_SCALING
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2).sqrt()
    shape = (-1, *[1] * (like.dim() - 1))
    return c_skip.reshape(shape), c_out.reshape(shape)


def clean_and_noise(
    prediction: torch.Tensor, prediction_type: str, noisy: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean sample and the noise a prediction of `prediction_type` implies for x = alpha x0 + sigma n."""
    prediction, noisy = prediction.float(), noisy.float()
    if prediction_type == "epsilon":
        return (noisy - sigma * prediction) / alpha, prediction
    if prediction_type == "v_prediction":
        return alpha * noisy - sigma * prediction, alpha * prediction + sigma * noisy
    if prediction_type == "sample":
        return prediction, (noisy - alpha * prediction) / sigma
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def consistency_output(
    prediction: torch.Tensor, prediction_type: str, noisy: torch.Tensor, timesteps: torch.Tensor, solver: SkippingSolver
) -> torch.Tensor:
    """The consistency function's value at (noisy, t) for a denoiser prediction there."""
    alpha, sigma = solver.scales(timesteps, noisy)
    clean, _ = clean_and_noise(prediction, prediction_type, noisy, alpha, sigma)
    c_skip, c_out = boundary_scalings(timesteps, noisy)
    return c_skip * noisy.float() + c_out * clean


def pseudo_huber(prediction: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """Per-sample pseudo-Huber distance sqrt(d^2 + c^2) - c, averaged over elements (LCM-LoRA's loss)."""
    difference = (prediction.float() - target.float()).pow(2)
    return ((difference + c * c).sqrt() - c).flatten(1).mean(dim=1)
