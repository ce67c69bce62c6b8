"""Few-step distillation (`train.objective: distill`): the frozen base is the teacher, base + adapter the student.

DDPM bases (SD1.x/2, SDXL, PixArt; epsilon, v or sample prediction) learn latent consistency distillation as
LCM-LoRA does (Luo et al. 2023, arXiv:2310.04378 and 2311.05556): from x at solver timestep t_{n+k}, the teacher
with guidance w drawn from `distill.guidance` takes one skipping DDIM step to t_n, and the student's consistency
function at (x, t_{n+k}) learns the target network's at (x_prev, t_n), the target being the student itself without
gradients or an EMA of its adapter. Flow-matching bases (SD3, Flux, Wan) learn reflow (Liu et al. 2022, "Flow
Straight and Fast", arXiv:2209.03003): flow matching on the teacher's own (noise, image) pairs, whose straighter
paths few Euler steps follow.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from lora_cli.adapters.injection import InjectedAdapter, adapters_disabled
from lora_cli.config.schema import DistillSection, Preset
from lora_cli.diffusion.consistency import SkippingSolver, clean_and_noise, consistency_output, pseudo_huber
from lora_cli.errors import DatasetError, PresetError
from lora_cli.io.safetensors_file import load_tensors
from lora_cli.sampling.schedulers import Sampler
from lora_cli.training.batch import MicroBatch, conditioning_for, denoising_loss, fresh_noise
from lora_cli.training.drawn import latent_path

if TYPE_CHECKING:
    from datasets_tools.scan import DatasetItem
    from lora_cli.models.base import Architecture, LoadedBase
    from lora_cli.training.session import TrainingSession


class Distillation:
    """The distillation objective of a run and its state (the EMA target's weights, when asked for)."""

    def __init__(self, preset: Preset, adapter: InjectedAdapter, base: LoadedBase) -> None:
        self.settings: DistillSection = preset.distill
        self.flow_matching = flow_matching = base.architecture.flow_matching
        self.sampler = distilled_sampler(preset, base)
        self.parameters = [p for component in adapter.components for p in adapter.parameters(component)]
        keep_ema = self.settings.target == "ema" and not flow_matching
        self.ema = [p.detach().clone() for p in self.parameters] if keep_ema else None
        self._solver: SkippingSolver | None = None
        self._teacher_latents: dict[int, torch.Tensor] = {}  # reflow: item -> the latents the teacher drew

    def loss(self, session: TrainingSession, batch: MicroBatch) -> torch.Tensor:
        if self.flow_matching:
            return self._reflow_loss(session, batch)
        return self._consistency_loss(session, batch)

    def _reflow_loss(self, session: TrainingSession, batch: MicroBatch) -> torch.Tensor:
        """Flow matching between each teacher image's starting noise and the latents it was drawn as."""
        for item in batch.items:
            if item not in self._teacher_latents:
                path = latent_path(session.data.items[item].image)
                self._teacher_latents[item] = load_tensors(path, DatasetError)[0]["latent"].float()
        latents = torch.stack([self._teacher_latents[item] for item in batch.items]).to(batch.latents.device)
        paired = MicroBatch(batch.items, latents, batch.conditioning, batch.generators, batch.weights)
        return denoising_loss(session, paired, paired_noise(session, paired))

    def after_step(self, session: TrainingSession) -> None:
        """Move the EMA target towards the student's new weights."""
        if self.ema is None:
            return
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.parameters], 1 - self.settings.ema_decay)

    def state(self) -> dict[str, Any]:
        return {"ema": [t.detach().cpu() for t in self.ema]} if self.ema is not None else {}

    def load_state(self, state: dict[str, Any]) -> None:
        if self.ema is not None:
            for mine, saved in zip(self.ema, state["ema"], strict=True):
                mine.copy_(saved)

    def _consistency_loss(self, session: TrainingSession, batch: MicroBatch) -> torch.Tensor:
        base, settings = session.base, self.settings
        architecture, scheduler = base.architecture, base.noise_scheduler
        prediction_type = scheduler.config.prediction_type
        if self._solver is None:
            self._solver = SkippingSolver.for_scheduler(scheduler.alphas_cumprod, settings.solver_steps)
        solver, latents, generators = self._solver, batch.latents.float(), batch.generators

        noise = fresh_noise(session, batch)
        start = torch.cat([solver.draw(g) for g in generators])
        alpha, sigma = solver.scales(start, latents)
        noisy = alpha * latents + sigma * noise
        low, high = settings.guidance
        scale = torch.cat([low + (high - low) * torch.rand(1, generator=g, device=g.device) for g in generators])
        scale = scale.reshape(-1, *[1] * (latents.dim() - 1))

        def predict(x: torch.Tensor, t: torch.Tensor, conditioning: dict[str, torch.Tensor]) -> torch.Tensor:
            with session.accelerator.autocast():
                return architecture.predict(session.denoiser, x.to(session.weight_dtype), t, conditioning)

        student = consistency_output(predict(noisy, start, batch.conditioning), prediction_type, noisy, start, solver)
        with torch.no_grad():
            unconditional = conditioning_for(session, [""] * len(batch.items), batch.items)
            both = {key: torch.cat([batch.conditioning[key], unconditional[key]]) for key in batch.conditioning}
            with adapters_disabled(session.adapter):
                guided, free = predict(torch.cat([noisy, noisy]), torch.cat([start, start]), both).chunk(2)
            guided_x0, guided_noise = clean_and_noise(guided, prediction_type, noisy, alpha, sigma)
            free_x0, free_noise = clean_and_noise(free, prediction_type, noisy, alpha, sigma)
            x0 = free_x0 + scale * (guided_x0 - free_x0)
            eps = free_noise + scale * (guided_noise - free_noise)
            previous = solver.step(x0, eps, start)
            earlier = solver.previous(start)
            with self._target_weights():
                target_prediction = predict(previous, earlier, batch.conditioning)
            target = consistency_output(target_prediction, prediction_type, previous, earlier, solver)
        if settings.loss == "huber":
            distance = pseudo_huber(student, target, settings.huber_c)
        else:
            distance = (student - target).pow(2).flatten(1).mean(dim=1)
        return (distance * batch.weights).mean()

    @contextmanager
    def _target_weights(self) -> Iterator[None]:
        """The target network: the student as it is, or with its adapter's EMA weights for the call."""
        if self.ema is None:
            yield
            return
        current = [p.detach().clone() for p in self.parameters]
        torch._foreach_copy_([p.data for p in self.parameters], self.ema)
        try:
            yield
        finally:
            torch._foreach_copy_([p.data for p in self.parameters], current)


def paired_noise(session: TrainingSession, batch: MicroBatch) -> torch.Tensor:
    """The noise each teacher image was drawn from: the pipeline's first latents for its seed (drawn on the CPU
    in float32, as diffusers' `randn_tensor` draws them for a list of CPU generators, in the layout training
    uses: Flux packs those same numbers into tokens afterwards)."""
    seeds = [session.data.noise_seeds[i] for i in batch.items]
    shape = (1, *batch.latents.shape[1:])
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(seed)) for seed in seeds]
    return torch.cat(noise).to(batch.latents.device)


def trained_dataset_items(preset: Preset, architecture: Architecture, items: list[DatasetItem]) -> list[DatasetItem]:
    """The dataset's own images a run trains on: all of them, except under reflow, which learns the teacher's
    (noise, image) pairs only (the dataset's captions still prompt the teacher)."""
    if preset.train.objective != "distill" or not architecture.flow_matching:
        return items
    if not preset.distill.teacher_images:
        raise PresetError(
            f"distill.teacher_images: reflow ({architecture.name} is a flow-matching base) trains on the teacher's "
            "own (noise, image) pairs; set it to 1 or more"
        )
    return []


def make_distillation(preset: Preset, adapter: InjectedAdapter, base: LoadedBase) -> Distillation | None:
    """The run's distillation objective (None for `train.objective: denoise`)."""
    if preset.train.objective != "distill":
        return None
    return Distillation(preset, adapter, base)


def distilled_sampler(preset: Preset, base: LoadedBase) -> Sampler:
    """What the distilled adapter samples with: LCM's scheduler for consistency distillation; the base's own flow
    (Euler) scheduler for reflow. Guidance 1 (no classifier-free guidance: the student learned the guided teacher),
    except that a guidance-embedding model (Flux dev) takes the value it was trained with (`flow.guidance`)."""
    settings = preset.distill
    if not base.architecture.flow_matching:
        return Sampler("lcm", settings.sample_steps, 1.0, settings.solver_steps)
    embedded = bool(getattr(base.denoiser.config, "guidance_embeds", False))
    return Sampler("default", settings.sample_steps, preset.flow.guidance if embedded else 1.0)
