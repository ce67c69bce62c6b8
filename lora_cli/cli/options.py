"""Option definitions shared by several commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lora_cli.errors import LoraCliError

Overrides = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a preset value: --set train.steps=200 (repeatable).", metavar="KEY=VALUE"),
]


BASE_HELP = "A diffusers folder, a single-file .safetensors checkpoint, builtin:NAME or a hub id."
BaseOption = Annotated[str | None, typer.Option("--base", help=f"The base: {BASE_HELP}", show_default=False)]


def parse_adapter(spec: str) -> tuple[Path, float]:
    """FILE or FILE:SCALE; the file must exist."""
    path_text, scale = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and not tail.endswith((".safetensors", "/")):
        try:
            path_text, scale = head, float(tail)
        except ValueError:
            raise LoraCliError(f"{spec}: the scale after ':' must be a number, e.g. {head}:0.8") from None
    path = Path(path_text)
    if not path.exists():
        raise LoraCliError(f"{path}: file not found")
    return path, scale
