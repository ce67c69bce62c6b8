"""The loss curve of a run as a PNG, read back from its metrics log.

The trainer draws it in a short-lived child process (`python -m lora_cli.training.plots METRICS OUT`), so
matplotlib never adds to the training process's memory peak.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from lora_cli.io.atomic import write_with


def plot_loss(metrics_file: Path, out: Path) -> None:
    """Raw loss per step and a smoothed curve (exponential moving average)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_file)
    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    smoothed, average = [], losses[0] if losses else 0.0
    for loss in losses:
        average = 0.9 * average + 0.1 * loss
        smoothed.append(average)
    figure, axes = plt.subplots(figsize=(6, 3.5), dpi=100)
    axes.plot(steps, losses, alpha=0.35, label="loss")
    axes.plot(steps, smoothed, label="smoothed")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.legend()
    figure.tight_layout()
    write_with(out, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)


def read_metrics(metrics_file: Path) -> list[dict]:
    """The logged records; a line cut short by a killed run is skipped."""
    records = []
    for line in metrics_file.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def plot_loss_in_subprocess(metrics_file: Path, out: Path) -> None:
    """Draw the plot in a child process; if that fails (a full disk, say) the run goes on without it."""
    command = [sys.executable, "-m", "lora_cli.training.plots", str(metrics_file), str(out)]
    subprocess.run(command, capture_output=True, check=False)


if __name__ == "__main__":
    plot_loss(Path(sys.argv[1]), Path(sys.argv[2]))
