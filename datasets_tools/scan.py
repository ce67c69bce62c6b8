"""Find image-caption pairs in a dataset folder (plain, or kohya `N_name` repeat sub-folders)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")

Severity = Literal["error", "warning", "info"]


@dataclass(frozen=True)
class Finding:
    """One problem found in a dataset: how bad, where, why, and what to do."""

    severity: Severity
    category: str
    file: str
    reason: str
    fix: str


@dataclass(frozen=True)
class DatasetItem:
    image: Path
    caption: str
    caption_file: Path | None
    repeats: int


@dataclass
class ScanResult:
    folder: Path
    items: list[DatasetItem] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]


def scan_folder(folder: str | Path, caption_extensions: list[str]) -> ScanResult:
    """List images with their captions; missing folders and empty datasets are error findings."""
    folder = Path(folder)
    result = ScanResult(folder)
    if not folder.is_dir():
        result.findings.append(
            Finding("error", "folder", str(folder), "dataset folder does not exist", "check data.folder")
        )
        return result
    for directory, repeats in _image_directories(folder):
        for image in sorted(p for p in directory.iterdir() if _is_image(p)):
            result.items.append(_item(image, caption_extensions, repeats, result.findings))
    if not result.items:
        result.findings.append(
            Finding(
                "error",
                "folder",
                str(folder),
                f"no images found ({', '.join(IMAGE_EXTENSIONS)})",
                "point data.folder at the folder that holds the images",
            )
        )
    return result


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dataset_fingerprint(items: list[DatasetItem], digests: list[str]) -> str:
    """sha256 over every image's digest, caption and repeat count, in order: identifies the training data."""
    digest = hashlib.sha256()
    for item, image_digest in zip(items, digests, strict=True):
        digest.update(f"{image_digest}\0{item.caption}\0{item.repeats}\0".encode())
    return digest.hexdigest()


def _image_directories(folder: Path) -> list[tuple[Path, int]]:
    repeat_dirs = []
    for child in sorted(folder.iterdir()):
        match = REPEAT_FOLDER.match(child.name)
        if child.is_dir() and not child.name.startswith(".") and match:
            repeat_dirs.append((child, int(match.group(1))))
    return [(folder, 1), *repeat_dirs]


def _is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def _item(image: Path, caption_extensions: list[str], repeats: int, findings: list[Finding]) -> DatasetItem:
    for extension in caption_extensions:
        candidate = image.with_suffix(extension)
        if candidate.is_file():
            try:
                text = candidate.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError:
                findings.append(
                    Finding(
                        "error",
                        "caption",
                        str(candidate),
                        "caption is not valid UTF-8",
                        "re-save it as UTF-8",
                    )
                )
                text = ""
            if not text:
                findings.append(
                    Finding(
                        "warning",
                        "caption",
                        str(candidate),
                        "caption is empty",
                        "write a caption or delete the file",
                    )
                )
            return DatasetItem(image, text, candidate, repeats)
    others = [p.name for p in image.parent.glob(image.stem + ".*") if p != image and p.suffix not in IMAGE_EXTENSIONS]
    fix = f"rename {others[0]} or add its extension to data.caption_extensions" if others else "add a caption file"
    findings.append(
        Finding(
            "warning",
            "caption",
            str(image),
            f"no caption ({'/'.join(caption_extensions)}); trains with an empty one",
            fix,
        )
    )
    return DatasetItem(image, "", None, repeats)
