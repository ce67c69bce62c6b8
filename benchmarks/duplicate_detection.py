"""Precision and recall of lora-check-dataset's near-duplicate detection on a generated corpus.

    python -m benchmarks.duplicate_detection [--seeds 0 1 2 3]

The corpus (`lora_cli.toy.graphics.corpus`) holds distinct simple graphics (centred shapes in several
colours, scattered shapes, icons, pixel art, line art, logos, products on white, smooth photo-like fields) and
true copies (resized, JPEG re-encoded, centre-cropped, colour-shifted). Pairs are counted: a reported pair is
two images in one reported cluster (exact or near); a true pair is two images of one picture. Printed for the
structure hash alone and with the colour confirmation the checker uses.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def measure(folder: Path, seed: int, colour: bool) -> tuple[float, float, int, int]:
    from datasets_tools import duplicates
    from datasets_tools.check import CheckOptions, check_dataset
    from lora_cli.toy.graphics import corpus, pair_scores, write_corpus

    groups = write_corpus(folder / f"seed{seed}", corpus(seed=seed))
    original = duplicates.same_colours
    if not colour:
        duplicates.same_colours = lambda first, second, alignment: True
    try:
        report = check_dataset(folder / f"seed{seed}", CheckOptions(resolution=64, workers=1))
    finally:
        duplicates.same_colours = original
    return pair_scores(groups, report.exact_duplicates + report.near_duplicates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        for colour in (False, True):
            label = "structure hash + colour confirmation" if colour else "structure hash alone (before)"
            for seed in args.seeds:
                precision, recall, reported, true = measure(Path(scratch), seed, colour)
                print(f"{label:38} seed {seed}: precision {precision:.3f} ({reported} pairs reported), "
                      f"recall {recall:.3f} (of {true} true pairs)")  # fmt: skip


if __name__ == "__main__":
    main()
