"""Option definitions shared by several commands."""

from __future__ import annotations

from typing import Annotated

import typer

Overrides = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a preset value: --set train.steps=200 (repeatable).", metavar="KEY=VALUE"),
]
