"""An offline judge for the shapes world: which colour and which shape an image shows.

Colour: the median RGB of saturated foreground pixels, nearest reference colour (or "other" when far from
all of them; a hue-only rule calls olive or orange "yellow"). Shape: a tiny CNN on the 32x32 foreground mask,
trained on procedural masks (`python -m lora_cli.toy.judge OUT.safetensors`, about two CPU-minutes).
"""

from __future__ import annotations

import argparse
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch import nn

from lora_cli.toy.shapes import COLOURS, SHAPES, draw_shape

SHAPE_CLASSES = (*SHAPES, "other")
MASK_SIZE = 32
MAX_COLOUR_DISTANCE = 80.0
MIN_CONFIDENCE = 0.7
MIN_FOREGROUND_PIXELS = 12


@dataclass(frozen=True)
class Verdict:
    colour: str
    shape: str
    confidence: float

    def matches(self, colour: str, shape: str) -> bool:
        return self.colour == colour and self.shape == shape


class ShapeClassifier(nn.Module):
    """Three conv layers and a linear head over a 1x32x32 foreground mask."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Linear(256, len(SHAPE_CLASSES))

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(masks).flatten(1))


def foreground(image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """(RGB pixels, boolean mask) of the saturated, not-too-dark pixels at 32x32."""
    image = image.convert("RGB").resize((MASK_SIZE, MASK_SIZE), Image.Resampling.BILINEAR)
    hsv = np.asarray(image.convert("HSV"), dtype=np.float32) / 255.0
    mask = (hsv[..., 1] > 0.35) & (hsv[..., 2] > 0.2)
    return np.asarray(image, dtype=np.float32), mask


def colour_of(image: Image.Image) -> str:
    pixels, mask = foreground(image)
    if mask.sum() < MIN_FOREGROUND_PIXELS:
        return "none"
    median = np.median(pixels[mask], axis=0)
    name, reference = min(COLOURS.items(), key=lambda item: np.linalg.norm(median - np.array(item[1])))
    return name if np.linalg.norm(median - np.array(reference)) <= MAX_COLOUR_DISTANCE else "other"


class Judge:
    """Colour rule + shape classifier. Load the shipped weights with `Judge.load()`."""

    def __init__(self, classifier: ShapeClassifier) -> None:
        self.classifier = classifier.eval()

    @classmethod
    def load(cls, path: str | Path | None = None) -> Judge:
        from safetensors.torch import load_file

        from lora_cli.builtin import builtin_path

        classifier = ShapeClassifier()
        classifier.load_state_dict(load_file(str(path or builtin_path("judge.safetensors"))))
        return cls(classifier)

    def __call__(self, images: list[Image.Image]) -> list[Verdict]:
        masks = torch.stack([torch.from_numpy(foreground(image)[1].astype(np.float32))[None] for image in images])
        with torch.no_grad():
            probabilities = self.classifier(masks).softmax(dim=1)
        verdicts = []
        for image, row in zip(images, probabilities, strict=True):
            confidence, index = row.max(dim=0)
            shape = SHAPE_CLASSES[int(index)] if confidence >= MIN_CONFIDENCE else "other"
            verdicts.append(Verdict(colour_of(image), shape, float(confidence)))
        return verdicts


def _other_shape(size: int, rng: random.Random) -> Image.Image:
    """Masks of no known class: irregular polygons, blobs, stripes."""
    big = size * 4
    image = Image.new("RGB", (big, big), (240, 240, 240))
    draw = ImageDraw.Draw(image)
    colour = (200, 30, 200)
    kind = rng.randrange(3)
    if kind == 0:
        sides = rng.randint(5, 9)
        angles = sorted(rng.uniform(0, 2 * math.pi) for _ in range(sides))
        radii = [rng.uniform(0.1, 0.4) * big for _ in range(sides)]
        draw.polygon(
            [(big / 2 + r * math.cos(a), big / 2 + r * math.sin(a)) for r, a in zip(radii, angles, strict=True)], colour
        )
    elif kind == 1:
        for _ in range(2):
            x, y, r = rng.uniform(0.3, 0.7) * big, rng.uniform(0.3, 0.7) * big, rng.uniform(0.1, 0.22) * big
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    else:
        width = rng.uniform(0.08, 0.2) * big
        x = rng.uniform(0.2, 0.8) * big
        draw.rectangle((x - width / 2, 0.1 * big, x + width / 2, 0.9 * big), fill=colour)
        image = image.rotate(rng.uniform(0, 180), fillcolor=(240, 240, 240))
    return image.resize((size, size), Image.Resampling.LANCZOS)


def _degrade(image: Image.Image, rng: random.Random) -> Image.Image:
    """Mimic generated images: softer edges, a low-resolution latent bottleneck, pixel noise."""
    if rng.random() < 0.4:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.9)))
    if rng.random() < 0.4:
        low = rng.randint(10, 16)
        image = image.resize((low, low), Image.Resampling.BILINEAR).resize(image.size, Image.Resampling.BILINEAR)
    if rng.random() < 0.3:
        noise = np.random.default_rng(rng.randrange(1 << 30)).normal(0, 12, (*image.size[::-1], 3))
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8))
    return image


def _training_masks(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = random.Random(seed)
    masks, labels = [], []
    for index in range(count):
        label = index % len(SHAPE_CLASSES)
        if SHAPE_CLASSES[label] == "other":
            image = _other_shape(MASK_SIZE, rng)
        else:
            image = draw_shape(rng.choice(list(COLOURS)), SHAPE_CLASSES[label], MASK_SIZE, rng)
        image = _degrade(image, rng)
        masks.append(torch.from_numpy(foreground(image)[1].astype(np.float32))[None])
        labels.append(label)
    return torch.stack(masks), torch.tensor(labels)


def procedural_accuracy(judge: Judge, per_pair: int, seed: int) -> float:
    """Joint colour-and-shape accuracy on freshly drawn images of every colour x shape."""
    rng = random.Random(seed)
    pairs = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    images = [draw_shape(colour, shape, MASK_SIZE, rng) for colour, shape in pairs for _ in range(per_pair)]
    expected = [pair for pair in pairs for _ in range(per_pair)]
    verdicts = judge(images)
    return sum(v.matches(*pair) for v, pair in zip(verdicts, expected, strict=True)) / len(images)


def train_judge(out: Path, steps: int = 4000, seed: int = 0) -> float:
    """Train the shape classifier, save it, and return its accuracy on fresh held-out masks."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    masks, labels = _training_masks(12000, seed)
    model = ShapeClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(0, len(masks), (64,), generator=generator)
        loss = nn.functional.cross_entropy(model(masks[index]), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    test_masks, test_labels = _training_masks(1200, seed + 1)
    with torch.no_grad():
        accuracy = (model(test_masks).argmax(dim=1) == test_labels).float().mean().item()
    save_file(model.state_dict(), str(out))
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m lora_cli.toy.judge", description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=4000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"shape accuracy on held-out masks: {train_judge(args.out, args.steps):.4f}")
    print(f"colour+shape accuracy on drawn images: {procedural_accuracy(Judge.load(args.out), 40, 7):.4f}")


if __name__ == "__main__":
    main()
