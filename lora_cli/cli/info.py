"""`lora-info ADAPTER`: what an adapter file holds, where it came from, and whether it fits a base."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from lora_cli.cli.errors import run_app
from lora_cli.cli.options import BaseOption

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


@app.command(
    help="Describe an adapter: layout, algorithm, layers, rank/alpha, provenance, damage; with --base, its fit."
)
def info(
    adapter: Annotated[Path, typer.Argument(help="Adapter .safetensors file (or peft folder).", show_default=False)],
    base: BaseOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    from lora_cli.toolbox.info import adapter_info, fit_to_base

    report = adapter_info(adapter)
    if base is not None:
        report["fit"] = fit_to_base(adapter, base)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    preset = report.pop("preset", None)
    for key, value in report.items():
        print(f"{key:16} {value if not isinstance(value, (dict, list)) else json.dumps(value)}")
    if preset:
        adapter_section = preset.get("adapter", {})
        print(f"{'trained with':16} {json.dumps(adapter_section)}")


def main() -> None:
    run_app(app, "lora-info")
