"""Assemble a training run from a preset: data, base, adapter, optimizer, accelerator and run state."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from datasets_tools.check import CheckOptions, Report, check_dataset
from datasets_tools.clips import check_clips
from lora_cli.adapters.injection import InjectedAdapter, inject_adapter
from lora_cli.config.schema import Preset
from lora_cli.errors import DatasetError, PresetError
from lora_cli.models import LoadedBase, load_base
from lora_cli.models.devices import cpu_only, release_cached_pinned_memory
from lora_cli.training.data import TrainingData, epoch_batches
from lora_cli.training.distill import make_distillation, trained_dataset_items
from lora_cli.training.encoders import BatchEncoder
from lora_cli.training.offload import offload_denoiser, offload_summary, stream_text_encoders
from lora_cli.training.optim import build_optimizer, build_scheduler
from lora_cli.training.outputs import RunPaths
from lora_cli.training.prior import prior_items
from lora_cli.training.sharding import refuse_unsupported_launch, shard_denoiser, wants_sharding
from lora_cli.training.teacher import teacher_items
from lora_cli.training.transfer_teacher import make_adapter_distillation


@dataclass(frozen=True)
class BatchSample:
    """One sample of a micro-batch: the data item and the seed of its randomness (VAE sample, noise,
    timestep, caption dropout). The seed depends on the run's seed, the micro-batch and the sample's position
    in the global batch, so a run on N processes draws exactly what a 1-process run with N times the batch
    draws, and a resumed run continues exactly."""

    item: int
    seed: int

    def generator(self, device: torch.device | None = None) -> torch.Generator:
        """A generator for this sample's draws, on `device` (the CPU by default): noise drawn where it is used
        needs no host-to-device copy. CPU and CUDA generators give different numbers for one seed."""
        return torch.Generator(device=device or "cpu").manual_seed(self.seed)


def sample_seed(run_seed: int, micro_step: int, position: int) -> int:
    return ((run_seed * 1_000_003 + micro_step) * 65_537 + position) % 2**63


@dataclass
class TrainingSession:
    """Everything the loop touches. `step` counts optimizer steps, `micro_step` global micro-batches consumed."""

    preset: Preset
    paths: RunPaths
    base: LoadedBase
    adapter: InjectedAdapter
    data: TrainingData
    encoder: BatchEncoder
    accelerator: Any
    denoiser: torch.nn.Module
    optimizer: Any
    scheduler: Any
    total_steps: int
    batches_per_epoch: int
    step: int = 0
    micro_step: int = 0
    skipped_steps: int = 0  # optimizer steps dropped for a non-finite loss or gradient (train.skip_nonfinite)
    sharded: bool = False  # the denoiser is split across processes (FSDP): every process draws and gathers
    weight_dtype: torch.dtype = torch.float32  # the frozen base's storage dtype: the denoiser's inputs follow it
    started: float = field(default_factory=time.perf_counter)  # when training began (for metrics)
    phases: dict[str, float] = field(default_factory=dict)  # seconds each startup phase took, for the log
    distillation: Any = None  # training/distill.Distillation under `train.objective: distill`
    adapter_teacher: Any = None  # training/transfer_teacher.AdapterDistillation under `train.objective: transfer`
    _epoch_order: tuple[int, list[list[int]]] | None = field(default=None, repr=False)
    _objectives: dict[tuple[int, ...], Any] = field(default_factory=dict, repr=False)

    def next_batch(self) -> list[BatchSample]:
        """This process's share of the next global micro-batch; advances the data position."""
        epoch, offset = divmod(self.micro_step, self.batches_per_epoch)
        world = self.accelerator.num_processes
        train = self.preset.train
        if self._epoch_order is None or self._epoch_order[0] != epoch:  # one shuffle per epoch, not per step
            order = epoch_batches(self.data, train.batch_size * world, train.seed, epoch, self.preset.data.shuffle)
            self._epoch_order = (epoch, order)
        batch = self._epoch_order[1][offset]
        batch = (batch * world)[: len(batch) + (-len(batch) % world)]  # top up a short batch: every rank gets items
        rank = self.accelerator.process_index
        samples = [
            BatchSample(self.data.entries[entry], sample_seed(train.seed, self.micro_step, position))
            for position, entry in enumerate(batch)
            if position % world == rank
        ]
        self.micro_step += 1
        return samples

    @property
    def epoch(self) -> float:
        return self.micro_step / self.batches_per_epoch

    def objective(self, latents: torch.Tensor) -> Any:
        """The architecture's objective for latents of this shape (Flux's shift depends on the image size)."""
        shape = tuple(latents.shape[1:])
        if shape not in self._objectives:
            self._objectives[shape] = self.base.architecture.objective(self.base, self.preset, latents)
        return self._objectives[shape]


def scan_dataset(preset: Preset) -> Report:
    """Run the dataset check (as `lora-check-dataset` does) before any model is loaded; errors stop the run
    with the first one, warnings are the caller's to print."""
    data = preset.data
    if data.folder is None:  # a distillation run whose teacher draws everything (the schema checks)
        return Report(folder="")
    if data.frames is not None:
        report = check_clips(data.folder, data.frames, data.fps, data.caption_extensions)
    else:
        options = CheckOptions(
            resolution=data.resolution, caption_extensions=data.caption_extensions, batch_size=preset.train.batch_size
        )
        counter = _caption_counter(preset)
        if counter is not None:
            options.count_tokens, options.max_tokens, options.counted_by = counter
        report = check_dataset(data.folder, options)
    _stop_on_errors(report, data.folder)
    _check_batch_fills(preset, report)
    return report


def _check_batch_fills(preset: Preset, report: Report) -> None:
    """A global batch the data cannot fill is refused before anything is loaded, unless allowed."""
    from datasets_tools.scan import scan_folder

    train, data, prior = preset.train, preset.data, preset.prior
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    samples = sum(item.repeats for item in report.items) * data.repeats
    if preset.train.objective == "distill" and preset.distill.teacher_images:
        from lora_cli.training.teacher import teacher_prompts

        samples += len(teacher_prompts(preset, report.items)) * preset.distill.teacher_images * data.repeats
    if prior.enabled:
        samples += len(prior.prompts) * prior.images_per_prompt
        samples += len(scan_folder(prior.folder, data.caption_extensions).items) if prior.folder else 0
    wanted = train.batch_size * processes
    if samples < wanted and not train.allow_short_batches:
        across = f" x {processes} processes" if processes > 1 else ""
        source = data.folder or "the teacher"
        raise PresetError(
            f"train.batch_size: {train.batch_size}{across} needs {wanted} samples per batch but {source} gives "
            f"{samples} (with repeats); lower train.batch_size, add images or repeats, or set "
            "train.allow_short_batches: true"
        )


def _caption_counter(preset: Preset):
    """The base's caption tokenizer and limit, so over-long captions are counted as the model reads them."""
    from lora_cli.models.source import open_base_source
    from lora_cli.models.tokens import caption_token_counter

    model = preset.model
    with open_base_source(model.path, "model.path", model.revision, model.variant, model.allow_pickle) as source:
        return caption_token_counter(source, model.max_text_tokens)


def _stop_on_errors(report: Report, folder: str) -> Report:
    errors = report.of("error")
    if errors:
        more = f" (+{len(errors) - 1} more; run lora-check-dataset {folder})" if len(errors) > 1 else ""
        raise DatasetError(f"{errors[0].line()}{more}")
    return report


def prepare_model(
    preset: Preset, scan: Report, generate_prior: bool = True, accelerator: Any = None
) -> tuple[LoadedBase, InjectedAdapter, TrainingData]:
    """Load the frozen base, gather prior images and a distillation teacher's images (drawn by the base before any
    adapter exists, shared among the `accelerator`'s processes), inject the adapter and index the data. Shared by
    training and --dry-run (which generates nothing)."""
    base = load_base(preset.model)
    root = run_paths(preset).root
    prior = prior_items(preset, base, root, generate_prior, accelerator) if preset.prior.enabled else []
    dataset = trained_dataset_items(preset, base.architecture, scan.items)
    teacher, seeds = teacher_items(preset, base, root, scan.items, generate_prior, accelerator)
    settings = preset.data
    data = TrainingData.build(
        dataset, settings.resolution, settings.repeats, prior, preset.prior.weight, settings.frames, settings.fps,
        teacher, seeds,
    )  # fmt: skip
    adapter = inject_adapter(base, preset.adapter, preset.train.seed)
    return base, adapter, data


def create_accelerator(preset: Preset) -> Any:
    """The accelerate state of this process (joins the process group when launched on several)."""
    from accelerate import Accelerator

    precision = preset.train.mixed_precision
    refuse_unsupported_launch()
    if precision == "fp16" and cpu_only():
        raise PresetError(
            "train.mixed_precision: fp16 needs a CUDA GPU (on the CPU it would train in float32 without saying so); "
            "use bf16 or no here"
        )
    try:
        return Accelerator(mixed_precision=precision)
    except (ValueError, RuntimeError) as exc:
        raise PresetError(f"train.mixed_precision: {precision} is not available here ({exc})") from None


def build_session(
    preset: Preset,
    paths: RunPaths,
    base: LoadedBase,
    adapter: InjectedAdapter,
    data: TrainingData,
    accelerator: Any = None,
) -> TrainingSession:
    """Wire up accelerate (a new one unless given), caches, optimizer and schedule around a prepared model."""
    train = preset.train
    accelerator = accelerator or create_accelerator(preset)
    device = accelerator.device
    if train.offload_blocks:  # the text encoders stream block by block too (before they move to the device)
        stream_text_encoders(base, device)
    for module in (base.vae, *base.text_encoders.values()):
        module.to(device)
    if train.gradient_checkpointing:
        base.denoiser.enable_gradient_checkpointing()
    base.denoiser.train()
    apply_speed_settings(base, train, device)

    encoder = BatchEncoder(base, data, preset, device)
    keep_encoders = bool(preset.sample.prompts)
    encoder.fill_caches(paths.cache, keep_encoders, on_progress=lambda message: None)
    if train.offload_blocks and device.type == "cuda":  # released encoders: their pinned copies back to the system
        release_cached_pinned_memory()

    # The denoiser is sharded (FSDP) or wrapped (DDP) before the optimizer sees its parameters: sharding
    # replaces them. Text encoders stay plain modules on the device; their adapter's gradients are averaged
    # by the loop.
    sharded = wants_sharding(preset, accelerator)
    if train.offload_blocks:  # before the denoiser moves to the device: offloaded weights never go there whole
        offloader = offload_denoiser(base, train.offload_blocks, device)
        base.pipeline_extras["offload"] = offload_summary(offloader, len(base.architecture.blocks(base.denoiser)))
    if sharded:
        shard_denoiser(base, preset.distributed.reshard_after_forward, device, accelerator.num_processes)
        denoiser = base.denoiser
    else:
        denoiser = accelerator.prepare_model(base.denoiser)

    groups = [{"params": adapter.parameters(base.architecture.denoiser_name), "lr": train.learning_rate}]
    for name in adapter.components:
        if name != base.architecture.denoiser_name:
            base.text_encoders[name].train()
            groups.append({"params": adapter.parameters(name), "lr": train.effective_text_encoder_lr})
    optimizer = build_optimizer(groups, train, sharded)

    world = accelerator.num_processes
    batches_per_epoch = len(epoch_batches(data, train.batch_size * world, train.seed, 0, False))
    total_steps = train.steps or math.ceil(train.epochs * batches_per_epoch / train.gradient_accumulation)
    scheduler = build_scheduler(optimizer, train, total_steps)

    optimizer = accelerator.prepare_optimizer(optimizer)
    return TrainingSession(
        preset=preset,
        paths=paths,
        base=base,
        adapter=adapter,
        data=data,
        encoder=encoder,
        accelerator=accelerator,
        denoiser=denoiser,
        optimizer=optimizer,
        scheduler=scheduler,
        total_steps=total_steps,
        batches_per_epoch=batches_per_epoch,
        sharded=sharded,
        weight_dtype=getattr(torch, preset.model.dtype),
        distillation=make_distillation(preset, adapter, base),
        adapter_teacher=make_adapter_distillation(preset, base, data, device),
    )


def run_paths(preset: Preset) -> RunPaths:
    return RunPaths(Path(preset.output.dir), preset.output.name)


def apply_speed_settings(base: LoadedBase, train: Any, device: torch.device) -> None:
    """TF32 on Ampere+, attention off cuDNN's kernels, channels-last UNet weights, and regional compilation of the
    denoiser's blocks."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = train.tf32
        torch.backends.cudnn.allow_tf32 = train.tf32
        # SDPA's cuDNN backend (preferred on Hopper by recent torch) has returned NaN gradients from a finite
        # loss in diffusers' own LoRA trainers (diffusers#9768) and at some shapes on H100/H200 (pytorch#196678);
        # flash and memory-efficient attention, which the peers train with, take over.
        torch.backends.cuda.enable_cudnn_sdp(False)
    unet = base.architecture.denoiser_name == "unet"
    if unet and (train.channels_last if train.channels_last is not None else device.type == "cuda"):
        base.denoiser.to(memory_format=torch.channels_last)
    if train.compile:
        for block in base.architecture.blocks(base.denoiser):
            base.denoiser.get_submodule(block).compile(dynamic=False)
