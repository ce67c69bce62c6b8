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

    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
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


def plot_loss_in_subprocess(metrics_file: Path, out: Path) -> None:
    subprocess.run([sys.executable, "-m", "lora_cli.training.plots", str(metrics_file), str(out)], check=True)


if __name__ == "__main__":
    plot_loss(Path(sys.argv[1]), Path(sys.argv[2]))
