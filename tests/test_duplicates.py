"""Near-duplicate detection judged on a generated corpus it was not written for: distinct simple graphics
must not be reported, true copies (resized, re-encoded, centre-cropped, colour-shifted) must be. The corpus
gates the thresholds (`datasets_tools.duplicates`); `python -m benchmarks.duplicate_detection` prints more seeds."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from datasets_tools.check import CheckOptions, check_dataset
from lora_cli.toy.graphics import corpus, pair_scores, write_corpus


@pytest.mark.parametrize("seed", [0, 3])
def test_precision_and_recall_on_the_corpus(seed: int, tmp_path: Path) -> None:
    groups = write_corpus(tmp_path, corpus(seed=seed))
    report = check_dataset(tmp_path, CheckOptions(resolution=64, workers=1))
    precision, recall, _, _ = pair_scores(groups, report.exact_duplicates + report.near_duplicates)
    assert precision >= 0.95 and recall >= 0.93, (precision, recall)


def test_the_structure_hash_alone_would_fail_the_gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the colour confirmation the corpus reports many distinct graphics as copies."""
    from datasets_tools import duplicates

    monkeypatch.setattr(duplicates, "same_colours", lambda first, second, alignment: True)
    groups = write_corpus(tmp_path, corpus(seed=0))
    report = check_dataset(tmp_path, CheckOptions(resolution=64, workers=1))
    precision, _, _, _ = pair_scores(groups, report.exact_duplicates + report.near_duplicates)
    assert precision < 0.8


def test_flat_shapes_in_different_colours_are_distinct(tmp_path: Path) -> None:
    """The reported false alarm: one flat shape per image, a red square 4 bits from a green one."""
    colours = ["red", "green", "blue", "orange", "purple", "black", "teal"]
    for index, colour in enumerate(colours):
        for shape in ("square", "circle"):
            image = Image.new("RGB", (128, 128), "white")
            draw = ImageDraw.Draw(image)
            (draw.rectangle if shape == "square" else draw.ellipse)((32, 32, 96, 96), fill=colour)
            image.save(tmp_path / f"{colour}-{shape}-{index}.png")
            (tmp_path / f"{colour}-{shape}-{index}.txt").write_text(f"a {colour} {shape}")
    copy = Image.open(tmp_path / "red-square-0.png").resize((100, 100))
    copy.save(tmp_path / "red-square-copy.png")
    (tmp_path / "red-square-copy.txt").write_text("a red square, smaller")
    report = check_dataset(tmp_path, CheckOptions(resolution=64, workers=1))
    assert [sorted(Path(p).name for p in cluster) for cluster in report.near_duplicates] == [
        ["red-square-0.png", "red-square-copy.png"]
    ]
