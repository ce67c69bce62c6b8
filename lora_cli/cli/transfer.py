"""`lora-transfer ADAPTER --from SOURCE --to TARGET OUT`: carry an adapter to another base without retraining."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lora_cli.cli.errors import run_app
from lora_cli.cli.lowrank import Energy, Rank
from lora_cli.cli.options import BASE_HELP
from lora_cli.errors import LoraCliError

THRESHOLD = 0.5
SUBSPACE_ENERGY = 0.99
METHODS = ("rotate", "project", "distill")
IMAGES_PER_PROMPT = 20
METHOD = METHODS[0]

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)

Threshold = Annotated[
    float | None,
    typer.Option(
        "--threshold",
        min=0.0,
        max=1.0,
        help=f"rotate/project: transfer layers whose subspace similarity reaches this (default {THRESHOLD}).",
        show_default=False,
    ),
]
SubspaceEnergy = Annotated[
    float | None,
    typer.Option(
        "--subspace-energy",
        min=0.01,
        max=1.0,
        help="rotate/project: each weight's principal subspace holds this share of its squared spectrum "
        f"(default {SUBSPACE_ENERGY}).",
        show_default=False,
    ),
]


@app.command(
    help="Carry an adapter (any algorithm) trained on one base to another base of the same architecture. "
    "rotate/project, training-free: in layers whose weights' principal subspaces are similar enough, the update is "
    "rotated with them (or projected onto the target's, LoRA-X); the others are skipped; writes LoRA at each "
    "layer's rank, or --rank / --energy. distill, without the original data: the source base with the adapter "
    "draws images of --prompts, and the adapter's own preset (or --preset) trains its replacement on the target."
)
def transfer(
    adapter: Annotated[Path, typer.Argument(help="The adapter file (or peft folder).", show_default=False)],
    out: Annotated[Path, typer.Argument(help="The LoRA file to write.", show_default=False)],
    source: Annotated[str, typer.Option("--from", help=f"The base it was trained on: {BASE_HELP}", show_default=False)],
    target: Annotated[str, typer.Option("--to", help=f"The base to carry it to: {BASE_HELP}", show_default=False)],
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="rotate: turn the update with the subspaces (nothing lost where they agree); "
            "project: keep only its part inside the target's subspaces (LoRA-X); "
            "distill: train a replacement on the target from images the source draws with the adapter.",
        ),
    ] = METHOD,
    prompts: Annotated[
        Path | None,
        typer.Option(
            "--prompts",
            help="distill: what the adapter draws, one prompt per line (default: its preset's preview prompts that "
            "are not prior prompts).",
            show_default=False,
        ),
    ] = None,
    preset: Annotated[
        Path | None,
        typer.Option(
            "--preset",
            help="distill: the training settings (default: the preset lora-cli recorded in the adapter).",
            show_default=False,
        ),
    ] = None,
    images_per_prompt: Annotated[
        int | None,
        typer.Option(
            "--images-per-prompt",
            min=1,
            help=f"distill: images the source draws per prompt (default {IMAGES_PER_PROMPT}).",
            show_default=False,
        ),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option("--steps", min=1, help="distill: training steps (default: the preset's).", show_default=False),
    ] = None,
    work: Annotated[
        Path | None,
        typer.Option(
            "--work",
            help="distill: folder for the drawn images and the training run (default: OUT's name + .transfer "
            "beside it); an interrupted transfer resumes from it.",
            show_default=False,
        ),
    ] = None,
    threshold: Threshold = None,
    subspace_energy: SubspaceEnergy = None,
    rank: Rank = None,
    energy: Energy = None,
) -> None:
    from lora_cli.toolbox.transfer import transfer as run

    if method not in METHODS:
        raise LoraCliError(f"--method {method}: choose {', '.join(METHODS)}")
    distilling = method == "distill"
    distill_options = {"--prompts": prompts, "--preset": preset, "--images-per-prompt": images_per_prompt}
    distill_options.update({"--steps": steps, "--work": work})
    subspace_options = {"--threshold": threshold, "--subspace-energy": subspace_energy, "--rank": rank}
    subspace_options["--energy"] = energy
    misplaced = subspace_options if distilling else distill_options
    for name, value in misplaced.items():
        if value is not None:
            methods = "--method rotate or project" if distilling else "--method distill"
            raise LoraCliError(f"{name} is an option of {methods}; drop it or change --method")
    if distilling:
        _distill(adapter, out, source, target, prompts, preset, images_per_prompt or IMAGES_PER_PROMPT, steps, work)
        return
    if rank is not None and energy is not None:
        raise LoraCliError("give at most one of --rank R or --energy SHARE")
    threshold = THRESHOLD if threshold is None else threshold
    subspace_energy = SUBSPACE_ENERGY if subspace_energy is None else subspace_energy
    report = run(adapter, source, target, out, threshold, subspace_energy, method, rank, energy)
    by_module = {layer.module: layer for layer in report.layers}
    for module, written_rank in report.written.items():
        layer = by_module[module]
        print(f"{module}  similarity {layer.similarity:.3f}  change {layer.change:.3f}  rank {written_rank}")
    for layer in report.skipped:
        print(f"skipped {layer.module}: similarity {layer.similarity:.3f} below {threshold}")
    for module in report.missing:
        print(f"skipped {module}: the target has no such layer")
    for module in report.reshaped:
        print(f"skipped {module}: the target's layer has another shape")
    skipped = len(report.skipped) + len(report.missing) + len(report.reshaped)
    print(f"{len(report.written)} layers transferred to {out}, {skipped} skipped")


def _distill(
    adapter: Path,
    out: Path,
    source: str,
    target: str,
    prompts: Path | None,
    preset: Path | None,
    images_per_prompt: int,
    steps: int | None,
    work: Path | None,
) -> None:
    from rich.console import Console

    from lora_cli.cli.quiet import quiet_libraries
    from lora_cli.training.teacher import read_prompts_file
    from lora_cli.training.transfer_distill import (
        DistillSettings,
        default_prompts,
        distill_transfer,
        training_preset,
    )

    quiet_libraries()
    settings_preset = training_preset(adapter, preset)
    if prompts is not None:
        drawn = read_prompts_file(prompts, "--prompts")
    else:
        drawn = default_prompts(settings_preset, adapter)
    folder = work if work is not None else out.with_name(out.stem + ".transfer")
    settings = DistillSettings(drawn, images_per_prompt, steps, folder)
    distill_transfer(adapter, source, target, out, settings_preset, settings, Console(stderr=True))
    print(f"{out} written: trained on {target} from {len(drawn) * images_per_prompt} images drawn by {source}")


def main() -> None:
    run_app(app, "lora-transfer")
