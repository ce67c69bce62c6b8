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
METHODS = ("rotate", "project")
METHOD = METHODS[0]

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)

Threshold = Annotated[
    float,
    typer.Option("--threshold", min=0.0, max=1.0, help="Transfer layers whose subspace similarity reaches this."),
]
SubspaceEnergy = Annotated[
    float,
    typer.Option(
        "--subspace-energy",
        min=0.01,
        max=1.0,
        help="Each weight's principal subspace holds this share of its squared spectrum.",
    ),
]


@app.command(
    help="Carry an adapter (any algorithm) trained on one base to another base of the same architecture, "
    "training-free: in layers whose weights' principal subspaces are similar enough, the update is rotated with "
    "them (or projected onto the target's, LoRA-X); the others are skipped. Writes LoRA at each layer's rank, "
    "or --rank / --energy."
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
            "project: keep only its part inside the target's subspaces (LoRA-X).",
        ),
    ] = METHOD,
    threshold: Threshold = THRESHOLD,
    subspace_energy: SubspaceEnergy = SUBSPACE_ENERGY,
    rank: Rank = None,
    energy: Energy = None,
) -> None:
    from lora_cli.toolbox.transfer import transfer as run

    if rank is not None and energy is not None:
        raise LoraCliError("give at most one of --rank R or --energy SHARE")
    if method not in METHODS:
        raise LoraCliError(f"--method {method}: choose {' or '.join(METHODS)}")
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


def main() -> None:
    run_app(app, "lora-transfer")
