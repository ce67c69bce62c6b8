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


class Callback(Protocol):
    def on_start(self, session: TrainingSession) -> None: ...

    def on_step(self, session: TrainingSession, metrics: dict[str, float]) -> None: ...

    def on_end(self, session: TrainingSession, completed: bool) -> None: ...


class MetricsLog:
    """JSON lines, one per logged step; a resumed run first drops lines past its checkpoint."""

    def __init__(self, path: Path, every: int) -> None:
        self.path, self.every = path, every

    def on_start(self, session: TrainingSession) -> None:
        from lora_cli.training.plots import read_metrics

        if self.path.exists():
            kept = [record for record in read_metrics(self.path) if record["step"] <= session.step]
            write_text_atomic(self.path, "".join(json.dumps(record) + "\n" for record in kept))

    def on_step(self, session: TrainingSession, metrics: dict[str, float]) -> None:
        if session.step % self.every == 0 or session.step == session.total_steps:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": session.step, **metrics}) + "\n")

    def on_end(self, session: TrainingSession, completed: bool) -> None:
        from lora_cli.training.plots import plot_loss_in_subprocess

        if self.path.exists():
            plot_loss_in_subprocess(self.path, session.paths.loss_plot)


class ProgressDisplay:
    """A rich progress bar with step, loss, learning rate, speed and ETA."""

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

    def on_step(self, session: TrainingSession, metrics: dict[str, float]) -> None:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        speed = (session.step - self.first_step) / elapsed
        self.progress.update(self.task, completed=session.step, loss=metrics["loss"], lr=metrics["lr"], speed=speed)

    def on_end(self, session: TrainingSession, completed: bool) -> None:
        self.progress.stop()


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

    def on_step(self, session: TrainingSession, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(f"train/{name}", value, session.step)

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

    def on_step(self, session: TrainingSession, metrics: dict[str, float]) -> None:
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

        sample = session.preset.sample
        models = [session.base.denoiser, *session.adapter.components.values()]
        modes = [model.training for model in models]
        for model in models:
            model.eval()  # no adapter dropout in previews
        pipeline = session.base.architecture.build_pipeline(session.base)
        with torch.random.fork_rng():  # previews must not move the training's random state
            images = generate_images(
                pipeline,
                sample.prompts,
                [sample.seed + i for i in range(len(sample.prompts))],
                sample.steps,
                sample.guidance_scale,
                sample.negative_prompt,
                session.preset.data.resolution,
                frames=session.preset.data.frames,
                text_tokens=session.base.pipeline_extras.get("text_tokens"),
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

    def on_step(self, session: TrainingSession, metrics: dict[str, float]) -> None:
        every = session.preset.output.save_every
        if every and session.step % every == 0:
            from lora_cli.training.resume import write_checkpoint

            write_checkpoint(session)

    def on_end(self, session: TrainingSession, completed: bool) -> None:
        pass


def default_callbacks(session: TrainingSession, show_progress: bool) -> list[Callback]:
    """The callbacks a preset asks for. Only the main process writes files; every process takes part in
    checkpoints (sharded state is gathered from all) and, with a sharded denoiser, in drawing previews."""
    preset = session.preset
    main = session.accelerator.is_main_process
    callbacks: list[Callback] = [MetricsLog(session.paths.metrics, preset.logging.every)] if main else []
    callbacks.append(Checkpoints())
    if main and preset.logging.tensorboard:
        callbacks.append(TensorBoardLog(session.paths.tensorboard))
    if preset.sample.prompts and (main or session.sharded):
        callbacks.append(Previews())
    if not main:
        return callbacks
    if show_progress:
        callbacks.append(ProgressDisplay())
    return callbacks
