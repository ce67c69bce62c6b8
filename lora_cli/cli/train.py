"""`lora-train PRESET`: train an adapter as a YAML preset describes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from lora_cli.cli.errors import run_app
from lora_cli.cli.options import Overrides
from lora_cli.cli.quiet import quiet_libraries

if TYPE_CHECKING:
    from lora_cli.config.schema import Preset

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


@app.command(help="Train a LoRA-family adapter as described by a YAML preset.")
def train(
    preset: Annotated[Path, typer.Argument(help="Preset YAML file.", show_default=False)],
    overrides: Overrides = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print the resolved preset, targets, parameters and data; do not train."),
    ] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the run folder's latest checkpoint.")] = False,
    resume_from: Annotated[
        Path | None,
        typer.Option("--resume-from", help="Continue from this checkpoint folder.", metavar="CHECKPOINT"),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the results of an earlier run in output.dir.")
    ] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Do not draw a progress bar.")] = False,
    allow_pickle: Annotated[
        bool,
        typer.Option("--allow-pickle", help="Accept a .ckpt/.pt/.bin base (restricted unpickling: tensors only)."),
    ] = False,
    plan: Annotated[
        bool,
        typer.Option("--plan", help="Estimate peak GPU memory and RAM from the weights' headers; do not train."),
    ] = False,
    vram: Annotated[
        str | None,
        typer.Option(
            "--vram", help="GPU memory budget for --plan, e.g. 12GiB: propose changes that fit.", metavar="SIZE"
        ),
    ] = None,
    ram: Annotated[
        str | None,
        typer.Option(
            "--ram", help="System RAM budget for --plan, e.g. 32GiB: propose changes that fit.", metavar="SIZE"
        ),
    ] = None,
    processes: Annotated[
        int,
        typer.Option(
            "--processes",
            min=1,
            help="For --plan: processes that will train together (GPUs); with distributed.strategy: fsdp the "
            "denoiser is split among them.",
        ),
    ] = 1,
    host_link: Annotated[
        float | None,
        typer.Option(
            "--host-link",
            min=0.1,
            help="For --plan: host-to-GPU bandwidth in GB/s that offloaded blocks are copied at (default 20; about "
            "25 on PCIe 4.0 x16, 12 on PCIe 3.0 x16 or 4.0 x8).",
            metavar="GBPS",
        ),
    ] = None,
) -> None:
    from rich.console import Console

    from lora_cli.config import load_preset
    from lora_cli.errors import PresetError

    if resume and overwrite:
        raise PresetError("--resume and --overwrite contradict each other; choose one")
    loaded = load_preset(preset, [*(overrides or []), *(["model.allow_pickle=true"] if allow_pickle else [])])
    quiet_libraries()
    planning = plan or vram is not None or ram is not None
    if processes > 1 and not planning:
        raise PresetError(
            "--processes is for --plan; to train on several processes start lora-train with accelerate launch or "
            "torchrun (docs/distributed.md)"
        )
    if planning:
        from lora_cli.planning import parse_size, plan_report

        images, note = _planned_images(loaded)
        report = plan_report(
            loaded,
            vram=parse_size(vram, "--vram") if vram is not None else None,
            ram=parse_size(ram, "--ram") if ram is not None else None,
            images=images,
            processes=processes,
            host_link_gbps=host_link,
        )
        Console().print(report if note is None else f"{note}\n{report}", highlight=False, markup=False, soft_wrap=True)
        return
    from lora_cli.training.distributed import launch_rank
    from lora_cli.training.run import train as run_training

    run_training(
        loaded,
        Console(stderr=True, quiet=launch_rank() != 0),  # one process reports (errors are printed by each)
        resume=resume,
        resume_from=resume_from,
        overwrite=overwrite,
        dry_run=dry_run,
        show_progress=not no_progress,
    )


def main() -> None:
    run_app(app, "lora-train")


def _planned_images(preset: Preset) -> tuple[int | None, str | None]:
    """The training images `--plan` counts, and a note instead when the dataset cannot be read yet: whether a
    base fits a GPU is asked before any dataset exists, and the plan needs only how many images caching takes."""
    from lora_cli.errors import DatasetError
    from lora_cli.training.session import scan_dataset

    try:
        return len(scan_dataset(preset).items), None
    except DatasetError as exc:
        return None, f"note: dataset not read ({exc}); planned without it"
