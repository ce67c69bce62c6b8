"""`python -m lora_cli.toy [FOLDER]`: build the tiny example model and dataset the default preset uses."""

from __future__ import annotations

import argparse
from pathlib import Path

from lora_cli.toy.shapes import write_dataset
from lora_cli.toy.tiny_pipeline import build_tiny_sd


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m lora_cli.toy", description=__doc__)
    parser.add_argument("folder", nargs="?", default="examples", type=Path, help="where to write (default: examples)")
    args = parser.parse_args()
    model = build_tiny_sd(args.folder / "tiny-sd", seed=0)
    data = args.folder / "stars"
    write_dataset(data, [("yellow", "star")], per_pair=8, size=64, seed=0)
    print(f"tiny model: {model}\ndataset:    {data}")


if __name__ == "__main__":
    main()
