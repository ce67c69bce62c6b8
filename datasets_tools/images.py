"""Inspect one image file: does it decode, what is it really, and what will training do to it.

Runs in worker processes, so it returns plain data. JPEGs are decoded in draft mode (DCT scaling): the
whole file is still parsed, so truncation is caught, at a fraction of the cost of a full-size decode.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from datasets_tools.buckets import bucket_step
from datasets_tools.findings import Finding

MAX_PIXELS = 16_384 * 16_384  # above this we refuse to decode (decompression-bomb guard)
EXTREME_ASPECT = 3.0
THUMB = 64  # JPEGs are decoded at about 4x this side (draft mode)
HASH_SIDE = 16
THUMB_SIDE = 16
CENTER_TRIM = 0.05
FORMAT_EXTENSIONS = {
    "JPEG": {".jpg", ".jpeg", ".jfif"},
    "PNG": {".png"},
    "WEBP": {".webp"},
    "BMP": {".bmp"},
    "GIF": {".gif"},
    "TIFF": {".tif", ".tiff"},
}


@dataclass
class ImageInfo:
    """What the checker learned about one image; `ok` is False when it cannot be trained on."""

    path: str
    ok: bool = False
    width: int = 0
    height: int = 0
    mode: str = ""
    format: str = ""
    pixel_hash: str = ""
    dhash: bytes = b""  # 256-bit difference hash of the whole image
    dhash_center: bytes = b""  # the same of its centre (5% trimmed per side), to catch lightly cropped copies
    thumb: bytes = b""  # 16x16 RGB thumbnail of the whole image: the colours a luminance hash cannot see
    thumb_center: bytes = b""  # the same of its centre
    findings: list[Finding] = field(default_factory=list)


def inspect_image(path: str | Path, resolution: int, upscale: bool = False) -> ImageInfo:
    path = Path(path)
    info = ImageInfo(str(path))
    if path.stat().st_size == 0:
        info.findings.append(_file_error(path, "zero-byte", "the file is empty", "delete it or replace it"))
        return info
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                _describe(image, path, info, resolution)
                if info.width * info.height > MAX_PIXELS:
                    info.findings.append(
                        _file_error(
                            path,
                            "decompression-bomb",
                            f"{info.width}x{info.height} pixels; refused without decoding",
                            "downscale it (training never needs this many pixels)",
                        )
                    )
                    return info
                _fingerprint(image, info)
                smallest = bucket_step(resolution)
                if min(info.width, info.height) < smallest and not upscale:
                    info.findings.append(
                        _file_error(
                            path,
                            "too-small",
                            f"{info.width}x{info.height} is smaller than the smallest bucket side ({smallest} px at "
                            f"resolution {resolution}); images are never upscaled, so it cannot train",
                            "remove it, replace it with a larger original, or allow upscaling (--upscale)",
                        )
                    )
                    return info
    except UnidentifiedImageError:
        info.findings.append(
            _file_error(path, "unreadable", "not an image PIL can read", "convert it to PNG or JPEG, or delete it")
        )
        return info
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        info.findings.append(
            _file_error(
                path,
                "decompression-bomb",
                "declares far more pixels than any photo; refused undecoded",
                "downscale it (training never needs this many pixels)",
            )
        )
        return info
    except (OSError, SyntaxError, ValueError) as exc:
        reason = f"cannot be decoded ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        info.findings.append(_file_error(path, "truncated", reason, "re-export the image; the file is damaged"))
        return info
    info.ok = True
    return info


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) as displayed (EXIF rotation applied), from the header alone."""
    with Image.open(path) as image:
        width, height = image.size
        if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):
            return height, width
        return width, height


def _describe(image: Image.Image, path: Path, info: ImageInfo, resolution: int) -> None:
    info.format = image.format or ""
    info.mode = image.mode
    orientation = image.getexif().get(0x0112, 1)
    width, height = image.size
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    info.width, info.height = width, height
    add = info.findings.append
    expected = FORMAT_EXTENSIONS.get(info.format)
    if expected and path.suffix.lower() not in expected:
        add(
            Finding(
                "warning",
                "file",
                "extension-mismatch",
                str(path),
                f"is a {info.format} file named {path.suffix}",
                f"rename it to {sorted(expected)[0]}",
            )
        )
    if getattr(image, "n_frames", 1) > 1:
        add(
            Finding(
                "warning",
                "file",
                "animated",
                str(path),
                f"animated ({image.n_frames} frames); only frame 1 trains",
                "export the frame you want as a still image",
            )
        )
    if orientation not in (1, None):
        add(
            Finding(
                "info",
                "pixels",
                "exif-rotation",
                str(path),
                f"EXIF orientation {orientation}",
                "nothing: lora-train rotates it upright, as viewers do",
            )
        )
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        add(
            Finding(
                "warning",
                "pixels",
                "alpha",
                str(path),
                "has transparency; it is composited on white",
                "flatten it onto the background you want",
            )
        )
    if image.mode in ("CMYK", "I;16", "I;16B", "I", "F"):
        add(
            Finding(
                "warning",
                "pixels",
                "mode",
                str(path),
                f"{image.mode} pixels are converted to 8-bit RGB",
                "export as 8-bit RGB to see exactly what trains",
            )
        )
    elif image.mode in ("L", "1", "P"):
        add(
            Finding(
                "info",
                "pixels",
                "mode",
                str(path),
                f"{image.mode} image (grayscale or palette) becomes RGB",
                "nothing, unless colour was expected",
            )
        )
    if min(width, height) < resolution:
        add(
            Finding(
                "warning",
                "pixels",
                "small",
                str(path),
                f"{width}x{height} is smaller than the training resolution {resolution} (it trains at a smaller size)",
                "use a larger original or a lower data.resolution",
            )
        )
    if max(width, height) / max(1, min(width, height)) > EXTREME_ASPECT:
        add(
            Finding(
                "warning",
                "pixels",
                "aspect",
                str(path),
                f"extreme aspect ratio {width}x{height}",
                "crop it; most of it would be cut away",
            )
        )


def _fingerprint(image: Image.Image, info: ImageInfo) -> None:
    """Decode (JPEG in draft mode), then hash the pixels and compute a 64-bit difference hash."""
    if image.format == "JPEG":
        image.draft("RGB", (THUMB * 4, THUMB * 4))
    image.load()
    upright = ImageOps.exif_transpose(image).convert("RGB")
    info.pixel_hash = hashlib.sha1(upright.tobytes()).hexdigest() + f"-{info.width}x{info.height}"
    width, height = upright.size
    trim_w, trim_h = round(width * CENTER_TRIM), round(height * CENTER_TRIM)
    center = upright.crop((trim_w, trim_h, width - trim_w, height - trim_h))
    info.dhash, info.dhash_center = difference_hash(upright.convert("L")), difference_hash(center.convert("L"))
    info.thumb, info.thumb_center = colour_thumbnail(upright), colour_thumbnail(center)


def difference_hash(gray: Image.Image) -> bytes:
    """dHash (Krawetz): signs of horizontal gradients on a 17x16 thumbnail, 256 bits. Resizing and
    re-compression change a few bits; different pictures differ in dozens."""
    small = np.asarray(gray.resize((HASH_SIDE + 1, HASH_SIDE), Image.Resampling.BILINEAR), dtype=np.int16)
    return np.packbits(small[:, 1:] < small[:, :-1]).tobytes()


def colour_thumbnail(image: Image.Image) -> bytes:
    """A THUMB_SIDE x THUMB_SIDE RGB thumbnail (box-averaged), 768 bytes."""
    return image.resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BOX).tobytes()


def _file_error(path: Path, code: str, reason: str, fix: str) -> Finding:
    return Finding("error", "file", code, str(path), reason, fix)
