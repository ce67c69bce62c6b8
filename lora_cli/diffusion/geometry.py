"""Where a training sample comes from in its image: what size-conditioned architectures (SDXL, PixArt-Alpha)
are told."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CropGeometry:
    """How an image becomes a training sample: its original size, the crop offset in the scaled image and
    the bucket size (SDXL's micro-conditioning feeds these to the model)."""

    original_width: int
    original_height: int
    crop_left: int
    crop_top: int
    width: int
    height: int
