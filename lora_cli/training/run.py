"""`lora-train` end to end: check the data, load the base, train (or describe the plan), write the adapter."""

from __future__ import annotations

import gc
import math
import time
from pathlib import Path

from rich.console import Console

from datasets_tools.check import Report
from lora_cli.adapters.files import write_adapter
from lora_cli.adapters.injection import InjectedAdapter, rank_notice
from lora_cli.adapters.keys import AdapterTensors
from lora_cli.config import Preset, preset_to_yaml
from lora_cli.errors import OutputWriteError
from lora_cli.io.atomic import write_text_atomic
from lora_cli.models import LoadedBase
from lora_cli.sharded_tensors import gather_state
from lora_cli.training.data import TrainingData
from lora_cli.training.distributed import check_processes_agree
from lora_cli.training.interrupt import stop_on_signals
from lora_cli.training.outputs import adapter_format, adapter_metadata, claim_run_folder, remove_stale_temporaries
from lora_cli.training.session import (
    TrainingSession,
    build_session,
    create_accelerator,
    prepare_model,
    run_paths,
    scan_dataset,
)
from lora_cli.training.sharding import sharding_summary


def train(
    preset: Preset,
    console: Console,
    resume: bool = False,
    resume_from: Path | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
    show_progress: bool = True,
) -> Path | None:
    """Run the preset; returns the adapter path (None for a dry run)."""
    from lora_cli.training.callbacks import default_callbacks
    from lora_cli.training.loop import run_loop
    from lora_cli.training.resume import find_checkpoint, restore_checkpoint

    scan = scan_dataset(preset)
    for finding in scan.of("warning"):
        console.print(f"[yellow]warning[/]: {finding.line()}", highlight=False)
    paths = run_paths(preset)
    resuming = resume or resume_from is not None
    accelerator = None if dry_run else create_accelerator(preset)
    if accelerator is not None:
        # Every process checks the run folder; the main one clears it (--overwrite) and removes what a killed
        # run left, and the others wait for that before anything is written.
        claim_run_folder(paths, resuming, overwrite, clear=accelerator.is_main_process)
        if accelerator.is_main_process:
            remove_stale_temporaries(paths)
        accelerator.wait_for_everyone()
    loading = time.perf_counter()
    base, adapter, data = prepare_model(preset, scan, generate_prior=not dry_run, accelerator=accelerator)
    loaded = time.perf_counter()
    if "quantization" in base.pipeline_extras:
        console.print(base.pipeline_extras["quantization"].line(), highlight=False)
    notice = rank_notice(preset.adapter, adapter.spec)
    if notice:
        console.print(f"[yellow]warning[/]: {notice}", highlight=False)
    if dry_run:
        _describe_plan(console, preset, scan, base, adapter, data)
        return None

    session = build_session(preset, paths, base, adapter, data, accelerator)
    session.phases = {"loading the base": loaded - loading, "setup and caching": time.perf_counter() - loaded}
    if "offload" in base.pipeline_extras:
        console.print(base.pipeline_extras["offload"], highlight=False)
    if session.sharded and session.accelerator.is_main_process:
        console.print(sharding_summary(session.base.denoiser, session.accelerator.num_processes), highlight=False)
    if resuming:
        checkpoint = find_checkpoint(session, resume_from)
        if checkpoint is None:
            console.print(f"[yellow]warning[/]: no checkpoint in {paths.checkpoints} yet; starting from step 0")
        else:
            restore_checkpoint(session, checkpoint)
            console.print(f"resumed from {checkpoint} at step {session.step}", highlight=False)
    if session.accelerator.is_main_process:
        paths.root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(paths.preset, preset_to_yaml(preset))
    with stop_on_signals() as stop:
        try:
            run_loop(session, default_callbacks(session, show_progress, console), stop)
        except OSError as exc:  # metrics, previews, plots (checkpoint writes name their own file)
            raise OutputWriteError(
                f"{paths.root}: cannot write ({exc.strerror or exc}); the checkpoints in {paths.checkpoints} are "
                "intact: free disk space and continue with --resume"
            ) from None
    session.accelerator.wait_for_everyone()
    tensors = gather_state(session.adapter.tensors())  # on every process: a sharded adapter is gathered
    check_processes_agree(session, tensors)
    if session.accelerator.is_main_process:
        _write_adapter(session, tensors)
        console.print(f"adapter written to {paths.adapter}", highlight=False)
    _leave_together(session)
    return paths.adapter


def _leave_together(session: TrainingSession) -> None:
    """Several processes leave the process group together, in an order that cannot hang: the DDP wrapper and
    optimizer (whose reducer holds the group) are released first, then after a barrier the group is destroyed.
    Destroying it first left the group's teardown to whenever the wrapper was freed, after the peer had gone,
    and one process in a few then waited forever (seen on CPU/gloo under load)."""
    accelerator = session.accelerator
    for tracker in accelerator.trackers:
        tracker.finish()
    session.denoiser = session.optimizer = None
    accelerator.free_memory()  # accelerate's own references to the prepared model and optimizer
    gc.collect()
    accelerator.wait_for_everyone()
    accelerator.state.destroy_process_group()


def _write_adapter(session: TrainingSession, tensors: AdapterTensors) -> None:
    preset = session.preset
    sampler = session.distillation.sampler if session.distillation is not None else None
    metadata = adapter_metadata(
        preset, session.base.identity, session.adapter, session.step, session.data.fingerprint, sampler
    )
    try:
        write_adapter(
            session.paths.adapter,
            tensors,
            session.adapter.ranks(),
            session.adapter.algorithm,
            adapter_format(preset, session.base.architecture),
            session.base.architecture,
            metadata,
        )
    except OSError as exc:
        raise OutputWriteError(
            f"{session.paths.adapter}: cannot write the adapter ({exc.strerror or exc}); the checkpoints in "
            f"{session.paths.checkpoints} are intact: free disk space and run again with --resume"
        ) from None


def _describe_plan(
    console: Console,
    preset: Preset,
    scan: Report,
    base: LoadedBase,
    adapter: InjectedAdapter,
    data: TrainingData,
) -> None:
    console.print("[bold]Resolved preset[/]")
    console.print(preset_to_yaml(preset), highlight=False, markup=False)
    for component, names in adapter.targets.items():
        console.print(f"[bold]{component}[/]: {len(names)} target modules", highlight=False)
        for name in names:
            console.print(f"  {name}", highlight=False, markup=False)
    total = sum(p.numel() for model in base.trainable_components().values() for p in model.parameters())
    trainable = adapter.trainable_count()
    console.print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)", highlight=False)
    uncaptioned = sum(1 for item in scan.items if not item.caption)
    if preset.prior.enabled:
        prior_count = len(data.items) - len(scan.items)
        planned = len(preset.prior.prompts) * preset.prior.images_per_prompt
        console.print(f"prior images: {prior_count} found, {planned} from prompts (generated when training)")
    batch = preset.train.batch_size
    batches = math.ceil(len(data.entries) / batch)
    console.print(
        f"dataset: {len(scan.items)} images ({uncaptioned} without caption), {len(data.entries)} per epoch "
        f"with repeats, {batches} batches of {batch} per epoch, {scan.count('warning')} warnings",
        highlight=False,
    )
    console.print(f"architecture: {base.identity.architecture}; base fingerprint {base.identity.fingerprint[:16]}")
