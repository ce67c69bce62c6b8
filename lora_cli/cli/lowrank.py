"""`lora-extract BASE TUNED OUT` and `lora-resize IN OUT`: low-rank LoRA by truncated SVD."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lora_cli.cli.errors import run_app
from lora_cli.cli.options import BASE_HELP, BaseOption
from lora_cli.errors import LoraCliError

extract_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
resize_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)

Rank = Annotated[int | None, typer.Option("--rank", min=1, help="Keep this many singular values per layer.")]
Energy = Annotated[
    float | None, typer.Option("--energy", min=0.0, max=1.0, help="Keep this share of each layer's spectrum.")
]


@extract_app.command(help="A LoRA from the difference between a tuned model and its base.")
def extract(
    base: Annotated[str, typer.Argument(help=f"The original model: {BASE_HELP}", show_default=False)],
    tuned: Annotated[str, typer.Argument(help=f"The fine-tuned model: {BASE_HELP}", show_default=False)],
    out: Annotated[Path, typer.Argument(help="The LoRA file to write.", show_default=False)],
    rank: Rank = None,
    energy: Energy = None,
) -> None:
    from lora_cli.toolbox.lowrank import extract as run

    _report(run(base, tuned, out, *_size(rank, energy)), out)


@resize_app.command(help="Re-express an adapter (LoRA, LoCon, LoHa, LoKr, DoRA) as plain LoRA of a given rank.")
def resize(
    adapter: Annotated[Path, typer.Argument(help="The adapter file.", show_default=False)],
    out: Annotated[Path, typer.Argument(help="The LoRA file to write.", show_default=False)],
    rank: Rank = None,
    energy: Energy = None,
    base: BaseOption = None,
) -> None:
    from lora_cli.toolbox.lowrank import resize as run

    _report(run(adapter, out, *_size(rank, energy), base), out)


def _size(rank: int | None, energy: float | None) -> tuple[int | None, float | None]:
    if (rank is None) == (energy is None):
        raise LoraCliError("give exactly one of --rank R or --energy SHARE (e.g. --energy 0.95)")
    return rank, energy


def _report(layers, out: Path) -> None:
    for layer in layers:
        print(f"{layer.module}  rank {layer.rank}  energy kept {layer.energy:.4f}")
    worst = min(layer.energy for layer in layers)
    mean = sum(layer.energy for layer in layers) / len(layers)
    print(f"{len(layers)} layers written to {out}; energy kept: mean {mean:.4f}, lowest {worst:.4f}")


def extract_main() -> None:
    run_app(extract_app, "lora-extract")


def resize_main() -> None:
    run_app(resize_app, "lora-resize")
