"""The training loop. One optimizer step = `gradient_accumulation` micro-batches, then clip, step, log."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from lora_cli.diffusion.losses import sample_noise, weighted_mse
from lora_cli.errors import TrainingDivergedError, TrainingInterrupted
from lora_cli.training.callbacks import Callback
from lora_cli.training.data import prepare_caption
from lora_cli.training.distributed import average_text_encoder_gradients
from lora_cli.training.interrupt import StopRequest
from lora_cli.training.session import BatchSample, TrainingSession
from lora_cli.training.sharding import gradient_sync_paused


def micro_batch_loss(session: TrainingSession, samples: list[BatchSample]) -> torch.Tensor:
    """The denoising loss of one micro-batch. Each sample's randomness comes from its own seeded generator."""
    base, preset = session.base, session.preset
    architecture = base.architecture
    device = session.accelerator.device
    item_indices = [sample.item for sample in samples]
    generators = [sample.generator() for sample in samples]

    # 1. Latents: sample the cached/live VAE distribution (the noise is drawn on the CPU for reproducibility).
    encodings = session.encoder.encodings(item_indices)
    sample_shape = encodings[:1, : encodings.shape[1] // 2].shape
    vae_noise = torch.cat([torch.randn(sample_shape, generator=g) for g in generators]).to(device)
    latents = architecture.latents_from_encoding(base, encodings, vae_noise)

    # 2. Forward process at random noise levels (the architecture's objective: DDPM or flow matching).
    one = (1, *latents.shape[1:])
    noise = torch.cat([sample_noise(one, preset.train.noise_offset, g) for g in generators]).to(device)
    noised = architecture.objective(base, preset, latents).noised(latents, noise, generators)

    # 3. Conditioning: captions after dropout/tag shuffling (empty captions keep the unconditional branch),
    #    plus what the architecture adds (SDXL's size and crop of each image, Flux's guidance value).
    data = preset.data
    captions = [
        prepare_caption(session.data.items[i].caption, data.shuffle_tags, data.keep_tags, data.caption_dropout, g)
        for i, g in zip(item_indices, generators, strict=True)
    ]
    conditioning = session.encoder.conditioning(captions)
    geometry = [session.data.geometry[i] for i in item_indices]
    conditioning.update(architecture.extra_conditioning(base, preset, geometry, device))
    # The frozen base may be stored in half precision (model.dtype); its inputs must match it.
    weight_dtype = base.denoiser.dtype
    noisy = noised.noisy.to(weight_dtype)
    conditioning = {
        key: value.to(weight_dtype) if value.is_floating_point() else value for key, value in conditioning.items()
    }

    # 4. Predict and compare with the objective's target; prior (class) images carry prior.weight.
    with session.accelerator.autocast():
        prediction = architecture.predict(session.denoiser, noisy, noised.timesteps, conditioning)
    weights = torch.tensor([session.data.weights[i] for i in item_indices], device=device) * noised.weights
    return weighted_mse(prediction, noised.target, weights)


def optimizer_step(session: TrainingSession) -> dict[str, float] | None:
    """Accumulate gradients over micro-batches, check they are finite, clip and step. Returns metrics, or None
    when the step was skipped for a non-finite loss or gradient."""
    accelerator, train = session.accelerator, session.preset.train
    accumulation = train.gradient_accumulation
    total = 0.0
    bad_loss: float | None = None
    for index in range(accumulation):
        items = session.next_batch()
        # Gradients are only averaged on the last micro-batch (DDP, FSDP); earlier ones accumulate locally.
        last = index == accumulation - 1
        sync = contextlib.nullcontext() if last else gradient_sync_paused(accelerator, session.denoiser)
        with sync:
            loss = micro_batch_loss(session, items)
            if bad_loss is None and not torch.isfinite(loss):
                bad_loss = loss.item()
            # Even a non-finite loss goes through backward: the last micro-batch then moves every pending
            # gradient (FSDP keeps unsynchronised ones outside the parameters) to where zero_grad clears them.
            accelerator.backward(loss / accumulation)
        total += loss.detach() / accumulation
    if _on_any_process(accelerator, bad_loss is not None):  # every process decides alike
        return _skip_or_stop(session, "loss", math.nan if bad_loss is None else bad_loss)

    average_text_encoder_gradients(session)
    params = [p for group in session.optimizer.param_groups for p in group["params"]]
    # Without a limit, "clipping" to infinity only measures the norm (sharded gradients included).
    grad_norm = float(accelerator.clip_grad_norm_(params, train.max_grad_norm or math.inf))
    if not math.isfinite(grad_norm) and not accelerator.scaler:  # the norm is the same on every process
        return _skip_or_stop(session, "gradient norm", grad_norm)
    lr = session.scheduler.get_last_lr()[0]
    session.optimizer.step()
    session.scheduler.step()
    session.optimizer.zero_grad(set_to_none=True)
    session.step += 1
    mean_loss = accelerator.reduce(total, reduction="mean").item() if accelerator.num_processes > 1 else total.item()
    metrics = {"loss": mean_loss, "lr": lr, "grad_norm": grad_norm, "epoch": session.epoch}
    return {**metrics, "skipped": session.skipped_steps} if session.skipped_steps else metrics


def _on_any_process(accelerator: Any, flag: bool) -> bool:
    if accelerator.num_processes == 1:
        return flag
    votes = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(votes, reduction="sum").item() > 0)


def _skip_or_stop(session: TrainingSession, what: str, value: float) -> None:
    """A non-finite loss or gradient: drop this optimizer step while `train.skip_nonfinite` allows, else stop."""
    if session.skipped_steps >= session.preset.train.skip_nonfinite:
        raise TrainingDivergedError(_diverged(session, what, value))
    session.skipped_steps += 1
    session.optimizer.zero_grad(set_to_none=True)


def run_loop(session: TrainingSession, callbacks: list[Callback], stop: StopRequest | None = None) -> None:
    """Train from `session.step` to `session.total_steps`, calling the callbacks around each step. A stop
    request (Ctrl-C, SIGTERM) ends the loop after the current step with a checkpoint."""
    for callback in callbacks:
        callback.on_start(session)
    completed = False
    try:
        while session.step < session.total_steps:
            metrics = optimizer_step(session)
            if metrics is None:
                continue
            for callback in callbacks:
                callback.on_step(session, metrics)
            if stop is not None and stop.requested(session.accelerator):
                _save_and_stop(session, stop)
        completed = True
    finally:
        for callback in callbacks:
            callback.on_end(session, completed)


def _save_and_stop(session: TrainingSession, stop: StopRequest) -> None:
    from lora_cli.training.checkpoint import checkpoint_dir
    from lora_cli.training.resume import write_checkpoint

    every = session.preset.output.save_every
    folder = checkpoint_dir(session.paths.checkpoints, session.step)
    if not (every and session.step % every == 0):  # unless this step's checkpoint was just written
        folder = write_checkpoint(session)  # on every process; the main one writes
    session.accelerator.wait_for_everyone()
    where = f"checkpoint saved to {folder}" if session.accelerator.is_main_process else "checkpoint saved"
    raise TrainingInterrupted(
        f"{stop.signal_name or 'stop requested'} at step {session.step}: {where}; continue with --resume"
    )


def _diverged(session: TrainingSession, what: str, value: float) -> str:
    return (
        f"step {session.step + 1}: {what} became {value}; lower train.learning_rate, "
        "use mixed_precision: no (or bf16), set train.max_grad_norm, or let train.skip_nonfinite skip isolated "
        "bad batches — the last checkpoint is kept"
    )
