"""Pieces every architecture shares: loading pipeline components from their sub-folders, and the VAE's
latent distribution."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lora_cli.config.schema import ModelSection


def load_components(spec: ModelSection, source: str, names: list[str], dtype: torch.dtype) -> dict[str, Any]:
    """The named components of a local diffusers folder, each loaded from its sub-folder with the class
    model_index.json declares (lighter than importing the pipeline class); weights in `dtype`."""
    import diffusers

    index = diffusers.DiffusionPipeline.load_config(source)
    components = {}
    for name in names:
        if name not in index or not isinstance(index[name], list) or index[name][1] is None:
            raise ValueError(f"the pipeline has no `{name}` component")
        library, class_name = index[name]
        component_class = getattr(importlib.import_module(library), class_name)
        is_model = isinstance(component_class, type) and issubclass(component_class, torch.nn.Module)
        extra = {"variant": spec.variant, "dtype": dtype} if is_model else {}
        components[name] = component_class.from_pretrained(source, subfolder=name, **extra)
    return components


def encode_images(vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The VAE's latent distribution parameters (mean and log-variance), sampled later per step."""
    return vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.parameters.float()


def latents_from_encoding(encoding: torch.Tensor, noise: torch.Tensor, scaling: float, shift: float) -> torch.Tensor:
    """A sample of the latent distribution, normalised as the denoiser expects: (z - shift) * scaling."""
    mean, logvar = encoding.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    return (mean + std * noise - shift) * scaling


def channel_normalised_latents(encoding: torch.Tensor, noise: torch.Tensor, vae_config: Any) -> torch.Tensor:
    """A sample of the latent distribution normalised per channel with the VAE's `latents_mean` and
    `latents_std` (Wan's and Qwen-Image's causal VAEs; their pipelines decode latents * std + mean)."""
    mean, logvar = encoding.chunk(2, dim=1)
    sample = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise
    view = (1, -1) + (1,) * (sample.dim() - 2)
    channel_mean = torch.tensor(vae_config.latents_mean, device=sample.device).view(view)
    channel_std = torch.tensor(vae_config.latents_std, device=sample.device).view(view)
    return (sample - channel_mean) / channel_std
