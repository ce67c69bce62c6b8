"""Pure helpers of the denoising objective: timesteps, noise, targets and loss weights."""

from __future__ import annotations

import torch


def sample_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform integer timesteps in [0, num_train_timesteps), on the generator's device."""
    return torch.randint(0, num_train_timesteps, (batch,), generator=generator, device=generator.device)


def sample_noise(shape: tuple[int, ...], offset: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise, plus per-channel offset noise (crosslabs.org/blog/diffusion-with-offset-noise) if offset > 0;
    drawn on the generator's device."""
    noise = torch.randn(shape, generator=generator, device=generator.device)
    if offset > 0:
        per_channel = (shape[0], shape[1], *[1] * (len(shape) - 2))
        noise = noise + offset * torch.randn(per_channel, generator=generator, device=generator.device)
    return noise


def prediction_target(
    prediction_type: str,
    scheduler: object,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """What the denoiser should output for the scheduler's prediction type."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "sample":
        return latents
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep."""
    alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alpha_bar / (1.0 - alpha_bar)


def min_snr_weights(snr_values: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023, arXiv:2303.09556), expressed for the model's target."""
    clipped = torch.clamp(snr_values, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr_values + 1.0)
    if prediction_type == "epsilon":
        return clipped / snr_values
    return clipped


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error per sample, optionally weighted, averaged over the batch (in float32)."""
    per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.device)
    return per_sample.mean()
