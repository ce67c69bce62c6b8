"""The check's readable summary: counts by severity and category, the worst offenders, histograms."""

from __future__ import annotations

from collections import Counter

from rich.console import Console
from rich.table import Table

from datasets_tools.check import Report

WORST = 15


def render(report: Report, console: Console) -> None:
    console.print(f"[bold]{report.folder}[/]: {report.images} images", highlight=False)
    counts = Table("category", "errors", "warnings", "info", title="Findings")
    by_category: Counter[tuple[str, str]] = Counter((f.category, f.severity) for f in report.findings)
    for category in sorted({c for c, _ in by_category}):
        counts.add_row(category, *(str(by_category[(category, s)]) for s in ("error", "warning", "info")))
    counts.add_row("[bold]total[/]", *(f"[bold]{report.count(s)}[/]" for s in ("error", "warning", "info")))
    console.print(counts)
    worst = [f for f in report.findings if f.severity != "info"][:WORST]
    if worst:
        table = Table("severity", "code", "file", "reason", "fix", title="Worst offenders")
        for finding in worst:
            colour = "red" if finding.severity == "error" else "yellow"
            table.add_row(f"[{colour}]{finding.severity}[/]", finding.code, finding.file, finding.reason, finding.fix)
        console.print(table)
        hidden = sum(1 for f in report.findings if f.severity != "info") - len(worst)
        if hidden > 0:
            console.print(f"... and {hidden} more (see --json for all)")
    for title, histogram in (
        ("Aspect-ratio buckets", report.buckets),
        ("Shorter side (px)", report.resolutions),
        ("Aspect ratios (w/h)", report.aspect_ratios),
    ):
        if histogram:
            _histogram(console, title, histogram)


def _histogram(console: Console, title: str, values: dict[str, int]) -> None:
    table = Table("value", "images", "", title=title, show_edge=False)
    largest = max(values.values())
    for key, count in values.items():
        table.add_row(key, str(count), "█" * max(1, round(30 * count / largest)))
    console.print(table)
