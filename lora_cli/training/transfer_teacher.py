"""Adapter distillation (`train.objective: transfer`), the training half of `lora-transfer --method distill`.

The teacher is another base of the same architecture (`transfer.source`) with an adapter trained on it
(`transfer.adapter`); the student is this run's base with the adapter being trained. At a noisy latent x_t of a
training image (timestep, noise and weighting drawn as the denoising objective draws them) the student learns
the teacher's prediction instead of the noise, velocity or image itself:

    L = w(t) · ‖ f_student(x_t, t, c) − f_teacher(x_t, t, c) ‖²

and on prior images, the target of preservation, this base's own prediction without the adapter. Knowledge
distillation in the sense of Hinton et al. (2015) on images the teacher drew (data-free transfer after
Trans-LoRA, Wang et al., NeurIPS 2024); matching outputs passes on far more per image than the images' noise
targets do. Both models see the same conditioning, encoded by this run's text encoders.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lora_cli.adapters.injection import adapters_disabled
from lora_cli.config.schema import Preset
from lora_cli.diffusion.losses import weighted_mse
from lora_cli.errors import PresetError
from lora_cli.training.batch import MicroBatch, fresh_noise

if TYPE_CHECKING:
    from lora_cli.models.base import LoadedBase
    from lora_cli.training.data import TrainingData
    from lora_cli.training.session import TrainingSession


class AdapterDistillation:
    """The teacher's denoiser (frozen, on the training device) and the loss that matches it."""

    def __init__(self, preset: Preset, base: LoadedBase, data: TrainingData, device: torch.device) -> None:
        self.teacher = teacher_denoiser(preset, base, device)
        self.prior_start = len(data.items) - data.prior_count

    def loss(self, session: TrainingSession, batch: MicroBatch) -> torch.Tensor:
        architecture = session.base.architecture
        noised = session.objective(batch.latents).noised(batch.latents, fresh_noise(session, batch), batch.generators)
        noisy = noised.noisy.to(session.weight_dtype)
        prior = torch.tensor([item >= self.prior_start for item in batch.items], device=noisy.device)
        with torch.no_grad(), session.accelerator.autocast():
            target = architecture.predict(self.teacher, noisy, noised.timesteps, batch.conditioning)
            if bool(prior.any()):
                with adapters_disabled(session.adapter):
                    own = architecture.predict(session.denoiser, noisy, noised.timesteps, batch.conditioning)
                target = torch.where(prior.view(-1, *[1] * (target.dim() - 1)), own, target)
        with session.accelerator.autocast():
            prediction = architecture.predict(session.denoiser, noisy, noised.timesteps, batch.conditioning)
        return weighted_mse(prediction, target, batch.weights * noised.weights)


def teacher_denoiser(preset: Preset, base: LoadedBase, device: torch.device) -> torch.nn.Module:
    """`transfer.source`'s denoiser (loaded with the preset's `model` settings) with `transfer.adapter` in it."""
    from lora_cli.models import load_base

    settings = preset.transfer
    teacher = load_base(preset.model.model_copy(update={"path": settings.source}))
    if teacher.architecture is not base.architecture:
        raise PresetError(
            f"transfer.source: {settings.source} is a {teacher.architecture.name} and model.path a "
            f"{base.architecture.name}; the teacher must be of the student's architecture"
        )
    load_teacher_adapter(teacher, Path(settings.adapter), "transfer.adapter")
    denoiser = teacher.denoiser.requires_grad_(False).eval().to(device)
    del teacher
    gc.collect()
    return denoiser


def load_teacher_adapter(base: LoadedBase, adapter: Path, where: str) -> None:
    """Put the teacher's adapter into `base`; refused when it has text-encoder layers, which distillation cannot
    carry (the teacher is given the student's text conditioning)."""
    from lora_cli.adapters.loading import load_adapter_file

    injected = load_adapter_file(base.trainable_components(), base.architecture, adapter)
    if set(injected.targets) != {base.architecture.denoiser_name}:
        raise PresetError(
            f"{where}: {adapter} has text-encoder layers, which distillation cannot carry (the teacher is given the "
            "student's text conditioning); use lora-transfer --method rotate"
        )


def make_adapter_distillation(
    preset: Preset, base: LoadedBase, data: TrainingData, device: torch.device
) -> AdapterDistillation | None:
    """The run's adapter distillation (None unless `train.objective: transfer`)."""
    if preset.train.objective != "transfer":
        return None
    return AdapterDistillation(preset, base, data, device)
