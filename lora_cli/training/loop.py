"""The training loop. One optimizer step = `gradient_accumulation` micro-batches, then clip, step, log."""

from __future__ import annotations

import contextlib
import math

import torch

from lora_cli.errors import TrainingDivergedError
from lora_cli.training.callbacks import Callback
from lora_cli.training.data import prepare_caption
from lora_cli.training.losses import (
    min_snr_weights,
    prediction_target,
    sample_noise,
    sample_timesteps,
    snr,
    weighted_mse,
)
from lora_cli.training.session import TrainingSession


def micro_batch_loss(session: TrainingSession, item_indices: list[int]) -> torch.Tensor:
    """The denoising loss of one micro-batch. All randomness comes from the session's generator."""
    base, preset, generator = session.base, session.preset, session.generator
    architecture, scheduler = base.architecture, base.noise_scheduler
    device = session.accelerator.device

    # 1. Latents: sample the cached/live VAE distribution (the noise is drawn on the CPU for reproducibility).
    encodings = session.encoder.encodings(item_indices)
    vae_noise = torch.randn(encodings[:, : encodings.shape[1] // 2].shape, generator=generator).to(device)
    latents = architecture.latents_from_encoding(base, encodings, vae_noise)

    # 2. Forward diffusion at random timesteps.
    noise = sample_noise(tuple(latents.shape), preset.train.noise_offset, generator).to(device)
    timesteps = sample_timesteps(len(item_indices), scheduler.config.num_train_timesteps, generator).to(device)
    noisy = scheduler.add_noise(latents, noise, timesteps)

    # 3. Conditioning: captions after dropout/tag shuffling (empty captions keep the unconditional branch).
    data = preset.data
    captions = [
        prepare_caption(
            session.data.items[i].caption, data.shuffle_tags, data.keep_tags, data.caption_dropout, generator
        )
        for i in item_indices
    ]
    conditioning = session.encoder.conditioning(captions)
    # The frozen base may be stored in half precision (model.dtype); its inputs must match it.
    weight_dtype = base.denoiser.dtype
    noisy = noisy.to(weight_dtype)
    conditioning = {key: value.to(weight_dtype) for key, value in conditioning.items()}

    # 4. Predict and compare with the target the scheduler's parameterisation asks for.
    with session.accelerator.autocast():
        prediction = architecture.predict(session.denoiser, noisy, timesteps, conditioning)
    prediction_type = scheduler.config.prediction_type
    target = prediction_target(prediction_type, scheduler, latents, noise, timesteps)
    # Per-sample weights: prior (class) images carry prior.weight; min-SNR rescales by timestep.
    weights = torch.tensor([session.data.weights[i] for i in item_indices], device=device)
    if preset.train.min_snr_gamma is not None:
        gamma = preset.train.min_snr_gamma
        weights = weights * min_snr_weights(snr(scheduler.alphas_cumprod, timesteps), gamma, prediction_type)
    return weighted_mse(prediction, target, weights)


def optimizer_step(session: TrainingSession) -> dict[str, float]:
    """Accumulate gradients over micro-batches, check they are finite, clip and step. Returns metrics."""
    accelerator, train = session.accelerator, session.preset.train
    accumulation = train.gradient_accumulation
    total = 0.0
    for index in range(accumulation):
        items = session.next_batch()
        # Gradients are only all-reduced on the last micro-batch (DDP); earlier ones accumulate locally.
        sync = contextlib.nullcontext() if index == accumulation - 1 else accelerator.no_sync(session.denoiser)
        with sync:
            loss = micro_batch_loss(session, items)
            if not torch.isfinite(loss):
                raise TrainingDivergedError(_diverged(session, "loss", loss.item()))
            accelerator.backward(loss / accumulation)
        total += loss.item() / accumulation

    params = [p for group in session.optimizer.param_groups for p in group["params"]]
    if train.max_grad_norm is not None:
        grad_norm = float(accelerator.clip_grad_norm_(params, train.max_grad_norm))
    else:
        grad_norm = float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
    if not math.isfinite(grad_norm) and not accelerator.scaler:
        raise TrainingDivergedError(_diverged(session, "gradient norm", grad_norm))
    lr = session.scheduler.get_last_lr()[0]
    session.optimizer.step()
    session.scheduler.step()
    session.optimizer.zero_grad(set_to_none=True)
    session.step += 1
    return {"loss": total, "lr": lr, "grad_norm": grad_norm, "epoch": session.epoch}


def run_loop(session: TrainingSession, callbacks: list[Callback]) -> None:
    """Train from `session.step` to `session.total_steps`, calling the callbacks around each step."""
    for callback in callbacks:
        callback.on_start(session)
    completed = False
    try:
        while session.step < session.total_steps:
            metrics = optimizer_step(session)
            for callback in callbacks:
                callback.on_step(session, metrics)
        completed = True
    finally:
        for callback in callbacks:
            callback.on_end(session, completed)


def _diverged(session: TrainingSession, what: str, value: float) -> str:
    return (
        f"step {session.step + 1}: {what} became {value}; lower train.learning_rate, "
        "use mixed_precision: no (or bf16), or set train.max_grad_norm — the last checkpoint is kept"
    )
