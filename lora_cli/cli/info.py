"""`lora-info ADAPTER`: what an adapter file holds, where it came from, and whether it fits a base."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from lora_cli.cli.errors import run_app
from lora_cli.cli.options import BaseOption
from lora_cli.errors import LoraCliError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


@app.command(
    help="Describe an adapter: layout, algorithm, layers, rank/alpha, provenance, damage; with --base, its fit."
)
def info(
    adapter: Annotated[Path, typer.Argument(help="Adapter .safetensors file (or peft folder).", show_default=False)],
    base: BaseOption = None,
    source: Annotated[
        str | None,
        typer.Option(
            "--from",
            help="With --base: the base the adapter was trained on, to report per layer how well it carries over "
            "to --base (lora-transfer's similarity). Default: the base its metadata records, when --base differs.",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    from lora_cli.toolbox.info import adapter_info, fit_to_base

    report = adapter_info(adapter)
    if base is not None:
        report["fit"] = fit_to_base(adapter, base)
        carried = _carry_over(adapter, base, source, report)
        if carried is not None:
            report["carry_over"] = carried
    if as_json:
        print(json.dumps(report, indent=2))
        return
    preset = report.pop("preset", None)
    carried = report.pop("carry_over", None)
    for key, value in report.items():
        print(f"{key:16} {value if not isinstance(value, (dict, list)) else json.dumps(value)}")
    if preset:
        adapter_section = preset.get("adapter", {})
        print(f"{'trained with':16} {json.dumps(adapter_section)}")
    if carried:
        print(f"{'carry-over':16} {_carry_over_line(carried)}")


def _carry_over(adapter: Path, base: str, source: str | None, report: dict) -> dict | None:
    """The carry-over report from SOURCE (or the recorded training base, when --base is another base)."""
    from lora_cli.cli.transfer import METHOD, SUBSPACE_ENERGY, THRESHOLD
    from lora_cli.toolbox.info import carry_over_summary

    if source is not None:
        return carry_over_summary(adapter, source, base, THRESHOLD, SUBSPACE_ENERGY, METHOD)
    recorded = report["provenance"].get("base_model")
    if recorded is None or report["fit"]["same_base_as_training"] is not False:
        return None
    try:
        return carry_over_summary(adapter, recorded, base, THRESHOLD, SUBSPACE_ENERGY, METHOD)
    except LoraCliError as exc:
        reason = str(exc).splitlines()[0][:200]
        return {"from": recorded, "unavailable": f"{reason}; pass --from SOURCE_BASE"}


def _carry_over_line(carried: dict) -> str:
    if "unavailable" in carried:
        return f"unknown: the training base {carried['from']} cannot be read ({carried['unavailable']})"
    total = len(carried["layers"]) + len(carried["missing_layers"])
    line = (
        f"{carried['similar_layers']} of {total} layers similar enough to transfer from {carried['from']} "
        f"(similarity >= {carried['threshold']}, mean {carried['mean_similarity']})"
    )
    for label in ("dissimilar_layers", "missing_layers"):
        if carried[label]:
            names = carried[label]
            line += f"; {label.replace('_', ' ')}: {', '.join(names[:5])}" + (" ..." if len(names) > 5 else "")
    return line


def main() -> None:
    run_app(app, "lora-info")
