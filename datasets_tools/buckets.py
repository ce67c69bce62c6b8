"""Aspect-ratio buckets (as kohya's sd-scripts use them): sizes of about resolution² pixels in steps of 64
(8 for tiny resolutions); each image goes to the bucket closest to its aspect ratio and is scaled to cover
it and centre-cropped. Without upscaling, an image smaller than its bucket gets a smaller bucket instead."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class Assignment:
    width: int
    height: int
    crop_fraction: float  # share of the scaled image cut away by the crop
    crop_left: int
    crop_top: int


def bucket_step(resolution: int) -> int:
    return 64 if resolution >= 256 else 8


@lru_cache(maxsize=8)
def make_buckets(resolution: int) -> tuple[tuple[int, int], ...]:
    """(width, height) pairs with area <= resolution², sides between resolution/2 and 2·resolution."""
    step = bucket_step(resolution)
    area = resolution * resolution
    low, high = max(step, resolution // 2), resolution * 2
    buckets = set()
    for width in range(low, high + 1, step):
        height = min(high, (area // width) // step * step)
        if height >= low:
            buckets.add((width, height))
            buckets.add((height, width))
    return tuple(sorted(buckets))


def assign_bucket(
    width: int, height: int, buckets: tuple[tuple[int, int], ...], step: int, upscale: bool = False
) -> Assignment:
    ratio = math.log(width / height)
    bucket_w, bucket_h = min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))
    scale = max(bucket_w / width, bucket_h / height)
    if scale > 1 and not upscale:
        # Shrink the bucket (same aspect, multiples of `step`) until the image covers it.
        bucket_w = max(step, int(bucket_w / scale) // step * step)
        bucket_h = max(step, int(bucket_h / scale) // step * step)
        scale = max(bucket_w / width, bucket_h / height)
    scaled_w, scaled_h = round(width * scale), round(height * scale)
    crop = 1 - (bucket_w * bucket_h) / max(1, scaled_w * scaled_h)
    return Assignment(bucket_w, bucket_h, max(0.0, crop), (scaled_w - bucket_w) // 2, (scaled_h - bucket_h) // 2)
