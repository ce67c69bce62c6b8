"""Procedural image-caption pairs: one coloured shape on a light background, captioned `a <colour> <shape>`."""

from __future__ import annotations

import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 50, 180),
}
SHAPES = ("circle", "square", "triangle", "star", "heart")
SUPERSAMPLE = 4


def shape_polygon(shape: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of `shape` centred at (cx, cy); circles and hearts are fine polygons."""
    if shape == "circle":
        points = [(math.cos(2 * math.pi * i / 48), math.sin(2 * math.pi * i / 48)) for i in range(48)]
    elif shape == "square":
        points = [(math.cos(a), math.sin(a)) for a in (math.pi / 4 + i * math.pi / 2 for i in range(4))]
    elif shape == "triangle":
        points = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2 + i * 2 * math.pi / 3 for i in range(3))]
    elif shape == "star":
        points = [
            ((1.0 if i % 2 == 0 else 0.45) * math.cos(a), (1.0 if i % 2 == 0 else 0.45) * math.sin(a))
            for i, a in enumerate(-math.pi / 2 + k * math.pi / 5 for k in range(10))
        ]
    elif shape == "heart":
        # The classic parametric heart curve, normalised to unit size.
        ts = [2 * math.pi * i / 48 for i in range(48)]
        points = [
            (
                16 * math.sin(t) ** 3 / 17,
                -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)) / 17,
            )
            for t in ts
        ]
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + radius * (x * cos - y * sin), cy + radius * (x * sin + y * cos)) for x, y in points]


def draw_shape(
    colour: str,
    shape: str,
    size: int,
    rng: random.Random,
    background: tuple[int, int] = (225, 250),
    radius_share: tuple[float, float] = (0.22, 0.34),
) -> Image.Image:
    """One image: jittered position, size (radius as a share of the side) and rotation; each background
    channel drawn from the `background` range (light and slightly varied by default)."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), tuple(rng.randint(*background) for _ in range(3)))
    radius = big * rng.uniform(*radius_share)
    cx = big / 2 + rng.uniform(-0.12, 0.12) * big
    cy = big / 2 + rng.uniform(-0.12, 0.12) * big
    angle = rng.uniform(-0.3, 0.3) if shape != "circle" else 0.0
    fill = tuple(max(0, min(255, c + rng.randint(-15, 15))) for c in COLOURS[colour])
    ImageDraw.Draw(image).polygon(shape_polygon(shape, cx, cy, radius, angle), fill=fill)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def write_dataset(
    folder: str | Path, pairs: list[tuple[str, str]], per_pair: int, size: int, seed: int = 0
) -> list[Path]:
    """Write `per_pair` PNG + .txt caption files for every (colour, shape) pair; returns the image paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    written = []
    for colour, shape in pairs:
        for index in range(per_pair):
            stem = folder / f"{colour}_{shape}_{index:04d}"
            draw_shape(colour, shape, size, rng).save(stem.with_suffix(".png"))
            stem.with_suffix(".txt").write_text(f"a {colour} {shape}\n", encoding="utf-8")
            written.append(stem.with_suffix(".png"))
    return written


def random_polygon(size: int, rng: random.Random) -> Image.Image:
    """A random 3-8 sided polygon in a random colour on a random background: generic data for the VAE."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), tuple(rng.randint(0, 255) for _ in range(3)))
    sides = rng.randint(3, 8)
    cx, cy, radius = rng.uniform(0.3, 0.7) * big, rng.uniform(0.3, 0.7) * big, rng.uniform(0.15, 0.4) * big
    angles = sorted(rng.uniform(0, 2 * math.pi) for _ in range(sides))
    points = [(cx + radius * math.cos(a), cy + radius * math.sin(a)) for a in angles]
    ImageDraw.Draw(image).polygon(points, fill=tuple(rng.randint(0, 255) for _ in range(3)))
    return image.resize((size, size), Image.Resampling.LANCZOS)
