"""The training loop. One optimizer step = `gradient_accumulation` micro-batches, then clip, step, log.

Nothing in a step waits for the accelerator: the loss, the gradient norm and whether both were finite stay on
the device (a non-finite step is undone there, `step_guard`), and the host reads them in one transfer every
`logging.every` steps, before a checkpoint and at the end — which is when a non-finite step is counted against
`train.skip_nonfinite` and, past it, stops the run.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch

from lora_cli.errors import TrainingDivergedError, TrainingInterrupted
from lora_cli.sharded_tensors import full_tensor
from lora_cli.training.batch import denoising_loss, fresh_noise, micro_batch_inputs
from lora_cli.training.callbacks import Callback
from lora_cli.training.distributed import average_text_encoder_gradients
from lora_cli.training.interrupt import StopRequest
from lora_cli.training.session import BatchSample, TrainingSession
from lora_cli.training.sharding import gradient_sync_paused
from lora_cli.training.step_guard import guarded_step, supports_deferred_skip


def micro_batch_loss(session: TrainingSession, samples: list[BatchSample]) -> torch.Tensor:
    """The loss of one micro-batch: the denoising objective, or a distillation objective's."""
    batch = micro_batch_inputs(session, samples)
    if session.distillation is not None:
        return session.distillation.loss(session, batch)
    if session.adapter_teacher is not None:
        return session.adapter_teacher.loss(session, batch)
    return denoising_loss(session, batch, fresh_noise(session, batch))


@dataclass
class StepRecord:
    """One optimizer step as the device knows it, until the host reads it."""

    step: int
    lr: float
    epoch: float
    loss: torch.Tensor  # mean over micro-batches (and processes, when read)
    grad_norm: torch.Tensor
    loss_finite: torch.Tensor  # every micro-batch's loss, on every process
    grad_finite: torch.Tensor


def optimizer_step(session: TrainingSession) -> StepRecord:
    """Accumulate gradients over micro-batches, clip and step, all without waiting for the device: a step whose
    loss or gradients were not finite on any process is undone on the device and judged when it is read."""
    accelerator, train = session.accelerator, session.preset.train
    accumulation = train.gradient_accumulation
    device = accelerator.device
    total = torch.zeros((), device=device)
    loss_finite = torch.ones((), dtype=torch.bool, device=device)
    for index in range(accumulation):
        items = session.next_batch()
        # Gradients are only averaged on the last micro-batch (DDP, FSDP); earlier ones accumulate locally.
        last = index == accumulation - 1
        sync = contextlib.nullcontext() if last else gradient_sync_paused(accelerator, session.denoiser)
        with sync:
            loss = micro_batch_loss(session, items)
            loss_finite &= torch.isfinite(loss.detach())
            # Even a non-finite loss goes through backward: the last micro-batch then moves every pending
            # gradient (FSDP keeps unsynchronised ones outside the parameters) to where zero_grad clears them.
            accelerator.backward(loss / accumulation)
        total += loss.detach() / accumulation

    average_text_encoder_gradients(session)
    params = [p for group in session.optimizer.param_groups for p in group["params"]]
    # Without a limit, "clipping" to infinity only measures the norm (sharded gradients included).
    grad_norm = accelerator.clip_grad_norm_(params, train.max_grad_norm or math.inf)
    grad_norm = full_tensor(grad_norm).detach() if isinstance(grad_norm, torch.Tensor) else torch.tensor(grad_norm)
    grad_finite = torch.isfinite(grad_norm.to(device))
    loss_finite = _on_every_process(accelerator, loss_finite)
    # With fp16 loss scaling an overflowing gradient is the scaler's business: it skips that step itself.
    finite = loss_finite if accelerator.scaler else loss_finite & grad_finite
    lr = session.scheduler.get_last_lr()[0]
    record = StepRecord(session.step + 1, lr, session.epoch, total, grad_norm, loss_finite, finite)
    inner = _inner(session.optimizer)
    if accelerator.scaler or not supports_deferred_skip(inner):
        if bool(finite.item()):  # this optimizer keeps state the device cannot undo: decide now
            session.optimizer.step()
    else:
        guarded_step(session.optimizer, finite, inner)
    if session.distillation is not None:
        session.distillation.after_step(session)
    session.scheduler.step()
    session.optimizer.zero_grad(set_to_none=True)
    session.step += 1
    return record


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer


def _on_every_process(accelerator: Any, flag: torch.Tensor) -> torch.Tensor:
    """True only if `flag` is true on every process (a collective, no host read)."""
    if accelerator.num_processes == 1:
        return flag
    votes = accelerator.reduce(flag.to(torch.float32).reshape(1), reduction="sum")
    return (votes == accelerator.num_processes).reshape(())


def read_records(session: TrainingSession, records: list[StepRecord]) -> list[dict[str, float]]:
    """The host's view of the pending steps (one transfer), in order: a non-finite step is counted against
    `train.skip_nonfinite`, and past the allowance the run stops naming the first such step."""
    if not records:
        return []
    accelerator = session.accelerator
    losses = torch.stack([record.loss for record in records])
    if accelerator.num_processes > 1:
        losses = accelerator.reduce(losses, reduction="mean")
    columns = [losses, *(torch.stack([getattr(r, name).to(losses.dtype) for r in records])
                         for name in ("grad_norm", "loss_finite", "grad_finite"))]  # fmt: skip
    values = torch.stack([column.detach().float().to(losses.device) for column in columns]).cpu().tolist()
    metrics = []
    for record, loss, grad_norm, loss_finite, finite in zip(records, *values, strict=True):
        if not finite:
            session.skipped_steps += 1
            if session.skipped_steps > session.preset.train.skip_nonfinite:
                what, value = ("loss", loss) if not loss_finite else ("gradient norm", grad_norm)
                raise TrainingDivergedError(_diverged(record.step, what, value))
        entry = {"step": record.step, "loss": loss, "lr": record.lr, "grad_norm": grad_norm, "epoch": record.epoch}
        metrics.append({**entry, "skipped": session.skipped_steps} if session.skipped_steps else entry)
    return metrics


def run_loop(session: TrainingSession, callbacks: list[Callback], stop: StopRequest | None = None) -> None:
    """Train from `session.step` to `session.total_steps`, calling the callbacks around each step. Steps are
    read by the host every `logging.every` steps (and the first, before checkpoints and at the end); a stop request
    (Ctrl-C, SIGTERM) ends the loop after the current step with a checkpoint."""
    for callback in callbacks:
        callback.on_start(session)
    completed = False
    pending: list[StepRecord] = []
    first_step = session.step + 1  # read at once: the log reports how long the first step took
    try:
        while session.step < session.total_steps:
            pending.append(optimizer_step(session))
            stopping = stop is not None and stop.requested(session.accelerator)
            metrics = None
            if stopping or session.step == first_step or _due(session):
                metrics = read_records(session, pending)
                pending.clear()
            for callback in callbacks:
                callback.on_step(session, metrics)
            if stopping:
                _save_and_stop(session, stop)
        completed = True
    finally:
        for callback in callbacks:
            callback.on_end(session, completed)


def _due(session: TrainingSession) -> bool:
    """Whether the host reads the pending steps now: at the logging cadence, before a checkpoint (a run past
    its allowance of non-finite steps must stop before writing one) and at the end."""
    step, preset = session.step, session.preset
    every = preset.output.save_every
    return step % preset.logging.every == 0 or step == session.total_steps or bool(every and step % every == 0)


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


def _diverged(step: int, what: str, value: float) -> str:
    return (
        f"step {step}: {what} became {value}; lower train.learning_rate, "
        "use mixed_precision: no (or bf16), set train.max_grad_norm, or let train.skip_nonfinite skip isolated "
        "bad batches — the last checkpoint is kept"
    )
