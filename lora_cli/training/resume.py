"""Capture a session's state into a checkpoint and restore it, so a resumed run continues exactly."""

from __future__ import annotations

from pathlib import Path

import torch

from lora_cli.adapters.keys import from_kohya, to_kohya
from lora_cli.errors import CheckpointError
from lora_cli.sharded_tensors import gather_state
from lora_cli.training.checkpoint import (
    TrainingState,
    checkpoint_dir,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from lora_cli.training.session import TrainingSession
from lora_cli.training.sharding import shard_optimizer_state

# Preset sections that must be identical to resume; the rest (logging, output, samples) may change, and so
# may train.steps/epochs (to train longer).
FROZEN_SECTIONS = ("model", "adapter", "data", "prior", "train", "flow", "distill", "cache")
MAY_CHANGE = {("train", "steps"), ("train", "epochs"), ("model", "allow_pickle")}


def write_checkpoint(session: TrainingSession) -> Path | None:
    """Every process calls this (sharded weights and optimizer state are gathered from all of them); the main
    process writes the checkpoint and returns its folder, the others return None."""
    adapter = gather_state(session.adapter.tensors())
    optimizer = gather_state(session.optimizer.state_dict())
    objective = gather_state(session.distillation.state()) if session.distillation is not None else None
    if not session.accelerator.is_main_process:
        return None
    table = session.base.architecture.kohya_table
    state = TrainingState(
        step=session.step,
        micro_step=session.micro_step,
        optimizer=optimizer,
        scheduler=session.scheduler.state_dict(),
        torch_rng=torch.get_rng_state(),
        cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        preset=session.preset.model_dump(mode="json"),
        grad_scaler=session.accelerator.scaler.state_dict() if session.accelerator.scaler else None,
        processes=session.accelerator.num_processes,
        objective=objective,
    )
    folder = checkpoint_dir(session.paths.checkpoints, session.step)
    try:
        save_checkpoint(folder, to_kohya(adapter, table), state)
    except OSError as exc:
        previous = list_checkpoints(session.paths.checkpoints)
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(
            f"step {session.step}: cannot write checkpoint {folder} ({exc.strerror or exc}); {kept}; "
            "free disk space and continue with --resume"
        ) from None
    prune_checkpoints(session.paths.checkpoints, session.preset.output.keep_last)
    return folder


def _check_unchanged(session: TrainingSession, saved_preset: dict, saved_processes: int, folder: Path) -> None:
    """Refuse a resume whose settings differ from the checkpoint's, except train.steps/epochs, and
    train.batch_size when the global batch (batch size x processes) stays the same."""
    current = session.preset.model_dump(mode="json")
    processes = session.accelerator.num_processes
    saved_global = saved_preset.get("train", {}).get("batch_size", 0) * saved_processes
    same_global = current["train"]["batch_size"] * processes == saved_global
    for section in FROZEN_SECTIONS:
        saved = saved_preset.get(section, {})
        fields = type(getattr(session.preset, section)).model_fields  # keys added since have their defaults
        changed = sorted(
            key
            for key in current[section]
            if saved.get(key, fields[key].default) != current[section][key]
            and (section, key) not in MAY_CHANGE
            and not ((section, key) == ("train", "batch_size") and same_global)
        )
        if changed:
            raise CheckpointError(
                f"{folder}: the checkpoint was trained with different `{section}` settings "
                f"({', '.join(f'{section}.{k}' for k in changed)}); restore them or start a new run"
            )


def find_checkpoint(session: TrainingSession, explicit: Path | None) -> Path | None:
    """The checkpoint to resume from: the given one, else the run folder's latest (None if it has none)."""
    if explicit is not None:
        return explicit
    found = list_checkpoints(session.paths.checkpoints)
    return found[-1] if found else None


def restore_checkpoint(session: TrainingSession, folder: Path) -> None:
    adapter_flat, state = load_checkpoint(folder)
    _check_unchanged(session, state.preset, state.processes, folder)
    table = session.base.architecture.kohya_table
    tensors = from_kohya(adapter_flat, table, session.adapter.targets, str(folder))
    session.adapter.load_tensors(tensors, str(folder))
    session.optimizer.load_state_dict(shard_optimizer_state(session.optimizer, state.optimizer))
    session.scheduler.load_state_dict(state.scheduler)
    if session.distillation is not None and state.objective:
        session.distillation.load_state(state.objective)
    if state.grad_scaler and session.accelerator.scaler:
        session.accelerator.scaler.load_state_dict(state.grad_scaler)
    torch.set_rng_state(state.torch_rng)
    if state.cuda_rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state.cuda_rng)
    session.step = state.step
    # The data position in global batches; a different global batch size counts the samples seen so far anew.
    saved_global = state.preset["train"]["batch_size"] * state.processes
    current_global = session.preset.train.batch_size * session.accelerator.num_processes
    session.micro_step = state.micro_step * saved_global // current_global
    if session.step > session.total_steps:
        raise CheckpointError(f"{folder}: checkpoint is at step {session.step}, past train.steps={session.total_steps}")
