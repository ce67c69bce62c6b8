"""`lora-merge BASE ADAPTER[:WEIGHT]... OUT`: fold adapters into a copy of the base's weights."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lora_cli.cli.errors import run_app
from lora_cli.cli.options import parse_adapter
from lora_cli.errors import LoraCliError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


@app.command(
    help="Merge one or more adapters (any algorithm and layout, weights may be negative) into a base (diffusers "
    "folder, single-file .safetensors, builtin:NAME or hub id); writes OUT in the same layout, or a single file "
    "when OUT ends in .safetensors."
)
def merge(
    paths: Annotated[list[str], typer.Argument(help="BASE, then ADAPTER[:WEIGHT]..., then OUT.", show_default=False)],
    allow_partial: Annotated[
        bool, typer.Option("--allow-partial", help="Merge what matches when some adapter layers match nothing.")
    ] = False,
    allow_pickle: Annotated[
        bool,
        typer.Option("--allow-pickle", help="Read .ckpt/.pt/.bin inputs (restricted unpickling: tensors only)."),
    ] = False,
) -> None:
    from rich.console import Console

    from lora_cli.toolbox.merge import merge_adapters

    if len(paths) < 3:
        raise LoraCliError("usage: lora-merge BASE ADAPTER[:WEIGHT] [ADAPTER[:WEIGHT] ...] OUT")
    base, out = paths[0], Path(paths[-1])
    adapters = [parse_adapter(spec) for spec in paths[1:-1]]
    result = merge_adapters(base, adapters, out, allow_partial, allow_pickle)
    console = Console(stderr=True)
    for line in result.warnings():
        console.print(f"[yellow]warning[/]: {line}", highlight=False)
    console.print(f"merged {result.merged_layers} layers into {out}", highlight=False)


def main() -> None:
    run_app(app, "lora-merge")
