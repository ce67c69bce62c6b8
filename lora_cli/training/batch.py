"""One micro-batch's inputs (latents, conditioning, per-sample randomness and weights) and its denoising loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lora_cli.diffusion.losses import sample_noise, weighted_mse
from lora_cli.training.data import prepare_caption

if TYPE_CHECKING:
    from lora_cli.training.session import BatchSample, TrainingSession


@dataclass
class MicroBatch:
    items: list[int]  # dataset item indices
    latents: torch.Tensor  # clean latents, float32
    conditioning: dict[str, torch.Tensor]  # in the frozen base's dtype, what `architecture.predict` takes
    generators: list[torch.Generator]  # each sample's own, on the training device
    weights: torch.Tensor  # per-sample data weights (prior images carry prior.weight)


def micro_batch_inputs(session: TrainingSession, samples: list[BatchSample]) -> MicroBatch:
    """Latents and conditioning of a micro-batch. Each sample's randomness comes from its own seeded generator,
    on the training device (its caption decisions from one on the CPU)."""
    base, preset = session.base, session.preset
    architecture = base.architecture
    device = session.accelerator.device
    item_indices = [sample.item for sample in samples]
    generators = [sample.generator(device) for sample in samples]
    caption_generators = generators if device.type == "cpu" else [sample.generator() for sample in samples]

    # Latents: sample the cached/live VAE distribution.
    encodings = session.encoder.encodings(item_indices)
    sample_shape = encodings[:1, : encodings.shape[1] // 2].shape
    vae_noise = torch.cat([torch.randn(sample_shape, generator=g, device=device) for g in generators])
    latents = architecture.latents_from_encoding(base, encodings, vae_noise)

    # Conditioning: captions after dropout/tag shuffling (empty captions keep the unconditional branch), plus
    # what the architecture adds (SDXL's size and crop of each image, Flux's guidance value).
    data = preset.data
    captions = [
        prepare_caption(session.data.items[i].caption, data.shuffle_tags, data.keep_tags, data.caption_dropout, g)
        for i, g in zip(item_indices, caption_generators, strict=True)
    ]
    conditioning = conditioning_for(session, captions, item_indices)
    weights = torch.tensor([session.data.weights[i] for i in item_indices], device=device)
    return MicroBatch(item_indices, latents, conditioning, generators, weights)


def conditioning_for(session: TrainingSession, captions: list[str], item_indices: list[int]) -> dict[str, torch.Tensor]:
    """The denoiser's conditioning for these captions of these items, in the frozen base's dtype (the base may be
    stored in half precision, model.dtype; its inputs must match it)."""
    base = session.base
    conditioning = session.encoder.conditioning(captions)
    geometry = [session.data.geometry[i] for i in item_indices]
    device = session.accelerator.device
    conditioning.update(base.architecture.extra_conditioning(base, session.preset, geometry, device))
    return {
        key: value.to(session.weight_dtype) if value.is_floating_point() else value
        for key, value in conditioning.items()
    }


def fresh_noise(session: TrainingSession, batch: MicroBatch) -> torch.Tensor:
    """Gaussian noise for each sample from its generator (with `train.noise_offset`)."""
    one = (1, *batch.latents.shape[1:])
    return torch.cat([sample_noise(one, session.preset.train.noise_offset, g) for g in batch.generators])


def denoising_loss(session: TrainingSession, batch: MicroBatch, noise: torch.Tensor) -> torch.Tensor:
    """The architecture's objective (DDPM or flow matching) at random noise levels: predict, compare with its
    target, weight by noise level and by sample."""
    noised = session.objective(batch.latents).noised(batch.latents, noise, batch.generators)
    with session.accelerator.autocast():
        prediction = session.base.architecture.predict(
            session.denoiser, noised.noisy.to(session.weight_dtype), noised.timesteps, batch.conditioning
        )
    return weighted_mse(prediction, noised.target, batch.weights * noised.weights)
