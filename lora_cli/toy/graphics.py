"""A corpus for judging near-duplicate detection: distinct simple graphics (flat shapes, icons, pixel art, line
art, logos, products on white — the pictures a luminance-only hash confuses) and true copies of pictures
(resized, re-encoded, centre-cropped, colour-shifted). Seeded, so the precision and recall it yields are
reproducible numbers."""

from __future__ import annotations

import io
import itertools
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageEnhance

from lora_cli.toy.shapes import shape_polygon

COLOURS = [
    (220, 30, 30), (30, 170, 40), (30, 60, 220), (240, 200, 20), (150, 40, 180), (20, 180, 190),
    (250, 130, 20), (120, 70, 30), (20, 20, 20), (240, 120, 170), (110, 110, 110), (0, 100, 70),
]  # fmt: skip
SHAPES = ("circle", "square", "triangle", "star")
KINDS = ("centred", "shape", "icon", "pixel-art", "line-art", "logo", "product", "photo")


@dataclass(frozen=True)
class CorpusImage:
    name: str
    group: int  # images of one group are copies of one picture; different groups are distinct pictures
    image: Image.Image


def distinct_graphic(kind: str, rng: random.Random, size: int = 256) -> Image.Image:
    """One simple graphic of `kind`, drawn with random colours and placement."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    if kind == "centred":  # one template, shape and colour varied: an icon set, a logo in several colours
        shape, colour = rng.choice(SHAPES), rng.choice(COLOURS)
        radius = size * 0.3
        if shape == "circle":
            draw.ellipse((size / 2 - radius, size / 2 - radius, size / 2 + radius, size / 2 + radius), fill=colour)
        else:
            draw.polygon(shape_polygon(shape, size / 2, size / 2, radius, 0.0), fill=colour)
    elif kind == "shape":
        _shape(draw, rng, size, rng.choice(SHAPES), rng.choice(COLOURS), scale=rng.uniform(0.25, 0.4))
    elif kind == "icon":
        for _ in range(rng.randint(2, 3)):
            _shape(draw, rng, size, rng.choice(SHAPES), rng.choice(COLOURS), scale=rng.uniform(0.12, 0.25))
    elif kind == "pixel-art":
        cells = rng.choice((8, 12, 16))
        small = Image.new("RGB", (cells, cells), "white")
        palette = rng.sample(COLOURS, 3)
        for x in range(cells):
            for y in range(cells):
                if rng.random() < 0.45:
                    small.putpixel((x, y), rng.choice(palette))
        image = small.resize((size, size), Image.Resampling.NEAREST)
    elif kind == "line-art":
        for _ in range(rng.randint(3, 6)):
            points = [(rng.uniform(0.1, 0.9) * size, rng.uniform(0.1, 0.9) * size) for _ in range(rng.randint(2, 5))]
            draw.line(points, fill=(20, 20, 20), width=rng.randint(2, 5))
    elif kind == "logo":
        colour = rng.choice(COLOURS)
        draw.rectangle(_box(rng, size, 0.5, 0.8), fill=colour)
        draw.text((size * rng.uniform(0.2, 0.5), size * rng.uniform(0.3, 0.6)), _word(rng), fill="white")
    elif kind == "product":
        colour = rng.choice(COLOURS)
        box = _box(rng, size, 0.35, 0.6)
        draw.rounded_rectangle(box, radius=size // 12, fill=colour)
        highlight = tuple(min(255, c + 60) for c in colour)
        draw.ellipse((box[0] + 8, box[1] + 8, box[0] + (box[2] - box[0]) // 3, box[1] + (box[3] - box[1]) // 4),
                     fill=highlight)  # fmt: skip
    else:  # photo-like: smooth random colour fields, the kind of picture a luminance hash handles well
        small = Image.new("RGB", (6, 6))
        for x in range(6):
            for y in range(6):
                small.putpixel((x, y), tuple(rng.randint(0, 255) for _ in range(3)))
        image = small.resize((size, size), Image.Resampling.BICUBIC)
    return image


def copy_of(image: Image.Image, transform: str, rng: random.Random) -> Image.Image:
    """A true copy: the same picture resized, re-encoded as JPEG, centre-cropped or colour-shifted."""
    width, height = image.size
    if transform == "resized":
        factor = rng.choice((0.5, 0.75, 1.25, 1.5))
        return image.resize((round(width * factor), round(height * factor)), Image.Resampling.LANCZOS)
    if transform == "re-encoded":
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=rng.randint(55, 90))
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    if transform == "cropped":
        trim = rng.uniform(0.03, 0.06)
        left, top = round(width * trim), round(height * trim)
        return image.crop((left, top, width - left, height - top))
    # colour-shifted: brightness, contrast and saturation a few percent, hue a few degrees
    shifted = ImageEnhance.Brightness(image).enhance(rng.uniform(0.92, 1.08))
    shifted = ImageEnhance.Contrast(shifted).enhance(rng.uniform(0.92, 1.08))
    shifted = ImageEnhance.Color(shifted).enhance(rng.uniform(0.85, 1.15))
    return _hue_shift(shifted, rng.uniform(-0.015, 0.015))


TRANSFORMS = ("resized", "re-encoded", "cropped", "colour-shifted")


def corpus(distinct_per_kind: int = 10, copied: int = 24, seed: int = 0) -> list[CorpusImage]:
    """`distinct_per_kind` distinct pictures of every kind (each its own group), and `copied` more pictures
    each with one copy per transform (the original and its copies share a group). No two groups hold the same
    picture (a template drawn twice with the same shape and colour is drawn again)."""
    rng = random.Random(seed)
    seen: set[bytes] = set()

    def fresh(kind: str) -> Image.Image:
        while True:
            image = distinct_graphic(kind, rng)
            if image.tobytes() not in seen:
                seen.add(image.tobytes())
                return image

    images: list[CorpusImage] = []
    for kind in KINDS:
        for index in range(distinct_per_kind):
            images.append(CorpusImage(f"{kind}-{index}", len(images), fresh(kind)))
    for index in range(copied):
        group = len(images)
        original = fresh(KINDS[index % len(KINDS)])
        images.append(CorpusImage(f"original-{index}", group, original))
        for transform in TRANSFORMS:
            images.append(CorpusImage(f"copy-{index}-{transform}", group, copy_of(original, transform, rng)))
    return images


def write_corpus(folder: Path, images: list[CorpusImage]) -> dict[str, int]:
    """PNG files with one caption each; returns {file path: group}."""
    folder.mkdir(parents=True, exist_ok=True)
    groups = {}
    for item in images:
        path = folder / f"{item.name}.png"
        item.image.save(path)
        path.with_suffix(".txt").write_text(f"{item.name.replace('-', ' ')}\n")
        groups[str(path)] = item.group
    return groups


def pair_scores(groups: dict[str, int], clusters: list[list[str]]) -> tuple[float, float, int, int]:
    """Precision and recall over image pairs (a reported pair: two images in one reported cluster; a true pair:
    two images of one group), and the counts of reported and true pairs."""
    reported = {frozenset(pair) for cluster in clusters for pair in itertools.combinations(cluster, 2)}
    true = {frozenset((a, b)) for a, b in itertools.combinations(groups, 2) if groups[a] == groups[b]}
    hits = len(reported & true)
    precision = hits / len(reported) if reported else 1.0
    return precision, hits / len(true), len(reported), len(true)


def _shape(draw: ImageDraw.ImageDraw, rng: random.Random, size: int, shape: str, colour, scale: float) -> None:
    radius = size * scale
    cx, cy = rng.uniform(radius, size - radius), rng.uniform(radius, size - radius)
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
    else:
        draw.polygon(shape_polygon(shape, cx, cy, radius, rng.uniform(0, 6.28)), fill=colour)


def _box(rng: random.Random, size: int, low: float, high: float) -> tuple[int, int, int, int]:
    width, height = rng.uniform(low, high) * size, rng.uniform(low, high) * size
    left, top = rng.uniform(0, size - width), rng.uniform(0, size - height)
    return round(left), round(top), round(left + width), round(top + height)


def _word(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHKLMNPRSTVXZ") for _ in range(rng.randint(3, 6)))


def _hue_shift(image: Image.Image, shift: float) -> Image.Image:
    """Rotate hues by `shift` of a turn (PIL's HSV mode stores hue as 0-255)."""
    hue, saturation, value = image.convert("HSV").split()
    hue = hue.point(lambda h: (h + round(shift * 256)) % 256)
    return Image.merge("HSV", (hue, saturation, value)).convert("RGB")
