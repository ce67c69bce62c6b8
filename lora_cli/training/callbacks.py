"""What happens around the loop: metrics log, progress bar, TensorBoard, previews and checkpoints."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from lora_cli.io.atomic import write_text_atomic, write_with
from lora_cli.training.session import TrainingSession

Metrics = list[dict[str, float]] | None  # the steps the host has just read (None: not read at this step)


class Callback(Protocol):
    def on_start(self, session: TrainingSession) -> None: ...

    def on_step(self, session: TrainingSession, metrics: Metrics) -> None: ...

    def on_end(self, session: TrainingSession, completed: bool) -> None: ...


class Throughput:
    """Adds wall time, samples/s over the steps read since the last read, and peak GPU memory to each record."""

    def __init__(self) -> None:
        self.last_time: float | None = None
        self.last_step = 0

    def on_start(self, session: TrainingSession) -> None:
        self.last_time, self.last_step = time.perf_counter(), session.step

    def on_step(self, session: TrainingSession, metrics: Metrics) -> None:
        if not metrics:
            return
        now = time.perf_counter()
        train = session.preset.train
        samples = (session.step - self.last_step) * train.batch_size * train.gradient_accumulation
        rate = samples * session.accelerator.num_processes / max(now - (self.last_time or now), 1e-9)
        extra = {"wall_s": round(now - session.started, 3), "samples_per_s": round(rate, 3)}
        if torch.cuda.is_available() and session.accelerator.device.type == "cuda":
            extra["gpu_peak_mib"] = round(torch.cuda.max_memory_allocated(session.accelerator.device) / 2**20, 1)
        for record in metrics:
            record.update(extra)
        self.last_time, self.last_step = now, session.step

    def on_end(self, session: TrainingSession, completed: bool) -> None:
        pass


class StartupReport:
    """One line once the first step is done: what loading, setup (caching included) and that step took."""

    def __init__(self, console: Any) -> None:
        self.console = console
        self.began = 0.0

    def on_start(self, session: TrainingSession) -> None:
        self.began = time.perf_counter()

    def on_step(self, session: TrainingSession, metrics: Metrics) -> None:
        if not metrics or self.began == 0.0:
            return
        phases = {**session.phases, "first step": time.perf_counter() - self.began}
        if session.preset.train.compile:
            phases["first step (compiling included)"] = phases.pop("first step")
        self.console.print("startup: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in phases.items()))
        self.began = 0.0

    def on_end(self, session: TrainingSession, completed: bool) -> None:
        pass


class MetricsLog:
    """JSON lines, one per logged step; a resumed run first drops lines past its checkpoint."""

    def __init__(self, path: Path, every: int) -> None:
        self.path, self.every = path, every

    def on_start(self, session: TrainingSession) -> None:
        from lora_cli.training.plots import read_metrics

        if self.path.exists():
            kept = [record for record in read_metrics(self.path) if record["step"] <= session.step]
            write_text_atomic(self.path, "".join(json.dumps(record) + "\n" for record in kept))

    def on_step(self, session: TrainingSession, metrics: Metrics) -> None:
        logged = [r for r in metrics or [] if r["step"] % self.every == 0 or r["step"] == session.total_steps]
        if logged:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.writelines(json.dumps(record) + "\n" for record in logged)

    def on_end(self, session: TrainingSession, completed: bool) -> None:
        from lora_cli.training.plots import plot_loss_in_subprocess

        if self.path.exists():
            plot_loss_in_subprocess(self.path, session.paths.loss_plot)


class ProgressDisplay:
    """A rich progress bar with step, loss, learning rate, speed and ETA (loss and rate as last read)."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("step {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[speed]:.2f} it/s"),
            TimeRemainingColumn(),
        )
        self.task: Any = None
        self.started = 0.0
        self.first_step = 0

    def on_start(self, session: TrainingSession) -> None:
        self.progress.start()
        self.task = self.progress.add_task(
            "train", total=session.total_steps, completed=session.step, loss=0.0, lr=0.0, speed=0.0
        )
        self.started, self.first_step = time.perf_counter(), session.step

    def on_step(self, session: TrainingSession, metrics: Metrics) -> None:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        fields = {"speed": (session.step - self.first_step) / elapsed}
        if metrics:
            fields.update(loss=metrics[-1]["loss"], lr=metrics[-1]["lr"])
        self.progress.update(self.task, completed=session.step, **fields)

    def on_end(self, session: TrainingSession, completed: bool) -> None:
        self.progress.stop()


class LogLines:
    """Without a progress bar (`--no-progress`, a log file): one line per read, every `logging.every` steps."""

    def __init__(self, console: Any) -> None:
        self.console = console

    def on_start(self, session: TrainingSession) -> None:
        pass

    def on_step(self, session: TrainingSession, metrics: Metrics) -> None:
        if not metrics:
            return
        record = metrics[-1]
        elapsed = record.get("wall_s", 0.0)
        done = record["step"] / session.total_steps
        left = elapsed / max(record["step"], 1) * (session.total_steps - record["step"]) if record["step"] else 0
        self.console.print(
            f"step {record['step']}/{session.total_steps} ({done:.0%})  loss {record['loss']:.4f}  "
            f"lr {record['lr']:.2e}  {record.get('samples_per_s', 0):.2f} samples/s  ETA {left:.0f}s",
            highlight=False,
        )

    def on_end(self, session: TrainingSession, completed: bool) -> None:
        pass


class TensorBoardLog:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.writer: Any = None

    def on_start(self, session: TrainingSession) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            from lora_cli.errors import PresetError

            raise PresetError(
                "logging.tensorboard: tensorboard is not installed; `pip install lora-cli[tensorboard]`"
            ) from None
        self.writer = SummaryWriter(str(self.folder), purge_step=session.step + 1)

    def on_step(self, session: TrainingSession, metrics: Metrics) -> None:
        for record in metrics or []:
            for name, value in record.items():
                if name != "step":
                    self.writer.add_scalar(f"train/{name}", value, record["step"])

    def on_end(self, session: TrainingSession, completed: bool) -> None:
        self.writer.close()


class Previews:
    """Preview grids at the start (the base alone), every N steps and at the end, with fixed seeds;
    at the end also a before/after grid."""

    def __init__(self) -> None:
        self.before: list[Image.Image] | None = None

    def on_start(self, session: TrainingSession) -> None:
        if session.step == 0:
            self.before = self._draw(session)

    def on_step(self, session: TrainingSession, metrics: Metrics) -> None:
        every = session.preset.sample.every
        if every and session.step % every == 0 and session.step < session.total_steps:
            self._draw(session)

    def on_end(self, session: TrainingSession, completed: bool) -> None:
        if not completed:
            return
        after = self._draw(session)
        if self.before is not None and session.accelerator.is_main_process:
            from lora_cli.sampling import image_grid

            rows = [[b, a] for b, a in zip(self.before, after, strict=True)]
            grid = image_grid(rows, session.preset.sample.prompts, ["before", f"after {session.step}"])
            write_with(session.paths.samples / "before-after.png", lambda tmp: grid.save(tmp, format="PNG"))

    def _draw(self, session: TrainingSession) -> list[Image.Image]:
        from lora_cli.sampling import generate_images, image_grid
        from lora_cli.sampling.schedulers import make_scheduler

        sample = session.preset.sample
        models = [session.base.denoiser, *session.adapter.components.values()]
        modes = [model.training for model in models]
        for model in models:
            model.eval()  # no adapter dropout in previews
        pipeline = session.base.architecture.build_pipeline(session.base)
        steps, guidance = sample.steps, sample.guidance_scale
        if session.distillation is not None:  # a distilled adapter previews as it will be used
            sampler = session.distillation.sampler
            pipeline.scheduler = make_scheduler(sampler.scheduler, pipeline.scheduler, sampler.solver_steps)
            steps = steps or sampler.steps
            guidance = sampler.guidance_scale if guidance is None else guidance
        with torch.random.fork_rng():  # previews must not move the training's random state
            images = generate_images(
                pipeline,
                sample.prompts,
                [sample.seed + i for i in range(len(sample.prompts))],
                steps,
                guidance,
                sample.negative_prompt,
                session.preset.data.resolution,
                frames=session.preset.data.frames,
                text_tokens=session.base.pipeline_extras.get("text_tokens"),
                guidance_parameter=session.base.architecture.cfg_parameter,
            )
        for model, mode in zip(models, modes, strict=True):
            model.train(mode)
        if session.accelerator.is_main_process:
            grid = image_grid([[image] for image in images], sample.prompts, [f"step {session.step}"])
            out = session.paths.samples / f"step-{session.step:06d}.png"
            write_with(out, lambda tmp: grid.save(tmp, format="PNG"))
        return images


class Checkpoints:
    def on_start(self, session: TrainingSession) -> None:
        pass

    def on_step(self, session: TrainingSession, metrics: Metrics) -> None:
        every = session.preset.output.save_every
        if every and session.step % every == 0:
            from lora_cli.training.resume import write_checkpoint

            write_checkpoint(session)

    def on_end(self, session: TrainingSession, completed: bool) -> None:
        pass


def default_callbacks(session: TrainingSession, show_progress: bool, console: Any = None) -> list[Callback]:
    """The callbacks a preset asks for. Only the main process writes files and reports; every process takes
    part in checkpoints (sharded state is gathered from all) and, with a sharded denoiser, in drawing previews."""
    preset = session.preset
    main = session.accelerator.is_main_process
    callbacks: list[Callback] = [Throughput()]
    if main:
        callbacks.append(MetricsLog(session.paths.metrics, preset.logging.every))
    callbacks.append(Checkpoints())
    if main and preset.logging.tensorboard:
        callbacks.append(TensorBoardLog(session.paths.tensorboard))
    if preset.sample.prompts and (main or session.sharded):
        callbacks.append(Previews())
    if not main:
        return callbacks
    if console is not None:
        callbacks.append(StartupReport(console))
    if show_progress:
        callbacks.append(ProgressDisplay())
    elif console is not None:
        callbacks.append(LogLines(console))
    return callbacks
