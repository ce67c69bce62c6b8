"""`lora-convert IN OUT --to kohya|diffusers|original`: change an adapter's key layout, exactly (`original`,
HunyuanVideo's fused module names for ComfyUI, keeps every layer's update exactly, not its factors)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from lora_cli.cli.errors import run_app
from lora_cli.cli.options import BaseOption

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


@app.command(
    help="Rewrite an adapter (any layout lora-cli reads) in the kohya (A1111/ComfyUI) or diffusers (peft) key "
    "layout, or for HunyuanVideo in its original fused module names (`original`: what ComfyUI reads for it). "
    "Kohya files without lora-cli metadata need --base to spell their module names."
)
def convert(
    adapter: Annotated[Path, typer.Argument(help="The adapter file.", show_default=False)],
    out: Annotated[Path, typer.Argument(help="The file to write.", show_default=False)],
    to: Annotated[Literal["kohya", "diffusers", "original"], typer.Option("--to", help="Target layout.")],
    base: BaseOption = None,
) -> None:
    from lora_cli.toolbox.convert import convert as run

    layers = run(adapter, out, to, base)
    print(f"{layers} layers written to {out} ({to} layout)")


def main() -> None:
    run_app(app, "lora-convert")
