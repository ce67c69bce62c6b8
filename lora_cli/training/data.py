"""Training data: images to tensors, captions with dropout/tag shuffling, and a resumable batch order.

Images are trained in aspect-ratio buckets (datasets_tools.buckets); batches are drawn within one bucket.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from datasets_tools.buckets import assign_bucket, bucket_step, make_buckets
from datasets_tools.clips import clip_info, read_clip
from datasets_tools.images import image_size
from datasets_tools.scan import DatasetItem, dataset_fingerprint, file_digest
from lora_cli.diffusion.geometry import CropGeometry


@dataclass(frozen=True)
class TrainingData:
    """The dataset as the trainer sees it: items (training images, then prior/class images), their content
    digests, loss weights and buckets, and one entry per repeat."""

    items: list[DatasetItem]
    digests: list[str]
    weights: list[float]
    entries: list[int]
    buckets: list[tuple[int, int]]
    fingerprint: str
    geometry: list[CropGeometry]
    frames: int | None = None  # video clips of this many frames (at `fps`) instead of images
    fps: float | None = None
    noise_seeds: tuple[int | None, ...] = ()  # per item: the seed a teacher drew it from (None: a real image)
    prior_count: int = 0  # the last this many items are prior images

    def pixels(self, index: int, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Item `index` as [3, H, W] (an image) or [3, F, H, W] (a clip) in [-1, 1], at its bucket size."""
        size = size or self.buckets[index]
        path = self.items[index].image
        if self.frames is None:
            return load_pixels(path, size)
        frames = read_clip(path, self.frames, self.fps)
        return torch.stack([image_to_tensor(frame, size) for frame in frames], dim=1)

    @classmethod
    def build(
        cls,
        items: list[DatasetItem],
        resolution: int,
        repeats: int,
        prior_items: list[DatasetItem] = (),
        prior_weight: float = 1.0,
        frames: int | None = None,
        fps: float | None = None,
        teacher_items: list[DatasetItem] = (),
        teacher_seeds: list[int] = (),
    ) -> TrainingData:
        """Training items (the dataset's, then a distillation teacher's drawings), then prior items."""
        trained = [*items, *teacher_items]
        everything = [*trained, *prior_items]
        digests = [media_digest(item.image) for item in everything]  # a frame folder hashes its frames
        weights = [1.0] * len(trained) + [prior_weight] * len(prior_items)
        times = [item.repeats * repeats for item in trained] + [item.repeats for item in prior_items]
        seeds = (*[None] * len(items), *teacher_seeds, *[None] * len(prior_items))
        entries = [index for index, count in enumerate(times) for _ in range(count)]
        geometry = [crop_geometry(item, resolution, clips=frames is not None) for item in everything]
        buckets = [(g.width, g.height) for g in geometry]
        fingerprint = dataset_fingerprint(everything, digests)
        return cls(
            everything, digests, weights, entries, buckets, fingerprint, geometry, frames, fps, seeds, len(prior_items)
        )


def crop_geometry(item: DatasetItem, resolution: int, clips: bool = False) -> CropGeometry:
    """The image's (or clip's frames') aspect-ratio bucket, never upscaled (the buckets `lora-check-dataset`
    reports), and crop."""
    width, height = media_size(item.image, clips)
    assignment = assign_bucket(width, height, make_buckets(resolution), bucket_step(resolution))
    return CropGeometry(width, height, assignment.crop_left, assignment.crop_top, assignment.width, assignment.height)


def media_size(path: Path, clip: bool) -> tuple[int, int]:
    """(width, height) of an image or of a clip's frames."""
    if clip:
        info = clip_info(path)
        return info.width, info.height
    return image_size(path)


def media_digest(path: Path) -> str:
    """sha256 of an image or video file; for a folder of frames, over its frames' digests in order."""
    if not path.is_dir():
        return file_digest(path)
    digest = hashlib.sha256()
    for frame in sorted(p for p in path.iterdir() if p.is_file()):
        digest.update(f"{frame.name}\0{file_digest(frame)}\0".encode())
    return digest.hexdigest()


def load_pixels(path: object, size: tuple[int, int]) -> torch.Tensor:
    """An image as a [3, H, W] tensor in [-1, 1]: EXIF rotation applied, RGB, scaled to cover, centre-cropped."""
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
        if image.mode in ("RGBA", "LA", "P"):
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image)
        image = image.convert("RGB")
    return image_to_tensor(image, size)


def image_to_tensor(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """An RGB image scaled to cover `size`, centre-cropped, as [3, H, W] in [-1, 1]."""
    width, height = size
    scale = max(width / image.width, height / image.height)
    resized = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(resized, Image.Resampling.LANCZOS)
    left, top = (resized[0] - width) // 2, (resized[1] - height) // 2
    image = image.crop((left, top, left + width, top + height))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def epoch_batches(data: TrainingData, batch_size: int, seed: int, epoch: int, shuffle: bool) -> list[list[int]]:
    """The epoch's batches of entry positions: each within one bucket, order a pure function of (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for position, item_index in enumerate(data.entries):
        by_bucket.setdefault(data.buckets[item_index], []).append(position)
    batches = []
    for bucket in sorted(by_bucket):
        positions = by_bucket[bucket]
        if shuffle:
            positions = [positions[i] for i in torch.randperm(len(positions), generator=generator).tolist()]
        batches += [positions[i : i + batch_size] for i in range(0, len(positions), batch_size)]
    if shuffle:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


def prepare_caption(
    caption: str, shuffle_tags: bool, keep_tags: int, dropout: float, generator: torch.Generator
) -> str:
    """Apply caption dropout (empty caption) and comma-separated tag shuffling, using the run's generator."""
    if dropout > 0 and torch.rand((), generator=generator).item() < dropout:
        return ""
    if not shuffle_tags:
        return caption
    tags = [tag.strip() for tag in caption.split(",") if tag.strip()]
    fixed, movable = tags[:keep_tags], tags[keep_tags:]
    order = torch.randperm(len(movable), generator=generator).tolist()
    return ", ".join(fixed + [movable[i] for i in order])
