"""Find image-caption pairs in a dataset folder: plain folders, kohya `N_name` repeat sub-folders, or a
`metadata.jsonl` (diffusers/Hugging Face `file_name` + `text` layout). Reads captions, never images."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from datasets_tools.findings import Finding

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif")
UNSUPPORTED_IMAGES = (".heic", ".heif", ".avif", ".psd", ".svg", ".raw", ".cr2", ".nef", ".exr", ".jxl")
CAPTION_LIKE = (".txt", ".caption", ".tags", ".json")
SYSTEM_FILES = {"thumbs.db", "desktop.ini", "metadata.jsonl"}
REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")
METADATA_FILE = "metadata.jsonl"
METADATA_CAPTION_KEYS = ("text", "caption", "prompt")


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
    """List images with their captions; a missing folder or no images is an error finding."""
    folder = Path(folder)
    result = ScanResult(folder)
    if not folder.is_dir():
        result.findings.append(
            Finding("error", "folder", "missing-folder", str(folder), "dataset folder does not exist", "check the path")
        )
        return result
    if (folder / METADATA_FILE).is_file():
        _scan_metadata(folder, result)
    else:
        for directory, repeats in _image_directories(folder, result):
            _scan_directory(directory, repeats, caption_extensions, result)
    if not result.items:
        result.findings.append(
            Finding(
                "error",
                "folder",
                "no-images",
                str(folder),
                f"no images found ({', '.join(IMAGE_EXTENSIONS)})",
                "point at the folder that holds the images",
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


def _image_directories(folder: Path, result: ScanResult) -> list[tuple[Path, int]]:
    directories = [(folder, 1)]
    for child in sorted(folder.iterdir()):
        if not child.is_dir() or child.name.startswith("."):
            continue
        match = REPEAT_FOLDER.match(child.name)
        if match:
            directories.append((child, int(match.group(1))))
        else:
            result.findings.append(
                Finding(
                    "info",
                    "folder",
                    "ignored-folder",
                    str(child),
                    "sub-folder without an N_name prefix is ignored",
                    "rename it to e.g. 5_name to train it 5 times per epoch",
                )
            )
    return directories


def _scan_directory(directory: Path, repeats: int, caption_extensions: list[str], result: ScanResult) -> None:
    files = sorted(p for p in directory.iterdir() if p.is_file() and not _hidden(p))
    stems_with_images = set()
    for path in files:
        suffix = path.suffix.lower()
        if suffix in IMAGE_EXTENSIONS:
            stems_with_images.add(path.stem)
            result.items.append(_item(path, caption_extensions, repeats, result.findings))
        elif suffix in UNSUPPORTED_IMAGES:
            result.findings.append(
                Finding(
                    "warning",
                    "file",
                    "unsupported-format",
                    str(path),
                    f"{suffix} images are not read",
                    "convert it to PNG or JPEG",
                )
            )
    for path in files:
        if path.suffix.lower() in CAPTION_LIKE and path.stem not in stems_with_images:
            result.findings.append(
                Finding(
                    "warning",
                    "caption",
                    "orphan-caption",
                    str(path),
                    "caption file without an image",
                    "add the image or delete the caption",
                )
            )


def _hidden(path: Path) -> bool:
    return path.name.startswith(".") or path.name.lower() in SYSTEM_FILES


def _item(image: Path, caption_extensions: list[str], repeats: int, findings: list[Finding]) -> DatasetItem:
    for extension in caption_extensions:
        candidate = image.with_suffix(extension)
        if candidate.is_file():
            return DatasetItem(image, _read_caption(candidate, findings), candidate, repeats)
    others = [image.with_suffix(e) for e in CAPTION_LIKE if e not in caption_extensions]
    other = next((p for p in others if p.is_file()), None)
    if other is not None:
        findings.append(
            Finding(
                "warning",
                "caption",
                "caption-extension",
                str(other),
                f"caption is a {other.suffix} file, but only {'/'.join(caption_extensions)} are read",
                f"add {other.suffix} to the caption extensions (data.caption_extensions) or rename it",
            )
        )
    else:
        findings.append(
            Finding(
                "warning",
                "caption",
                "missing-caption",
                str(image),
                f"no caption ({'/'.join(caption_extensions)}); trains with an empty one",
                "add a caption file",
            )
        )
    return DatasetItem(image, "", None, repeats)


def _read_caption(path: Path, findings: list[Finding]) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        findings.append(
            Finding("error", "caption", "not-utf8", str(path), "caption is not valid UTF-8", "re-save it as UTF-8")
        )
        return ""
    except OSError as exc:
        findings.append(
            Finding(
                "error",
                "caption",
                "unreadable-caption",
                str(path),
                f"cannot be read ({exc.strerror})",
                "check the file's permissions, or re-create it",
            )
        )
        return ""
    if not text:
        findings.append(
            Finding(
                "warning",
                "caption",
                "empty-caption",
                str(path),
                "caption is empty or only whitespace",
                "write a caption or delete the file",
            )
        )
    return text


def _scan_metadata(folder: Path, result: ScanResult) -> None:
    metadata = folder / METADATA_FILE
    for number, line in enumerate(metadata.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{metadata}:{number}"
        try:
            record = json.loads(line)
            name = record["file_name"]
            if not isinstance(name, str):
                raise TypeError(name)
        except (json.JSONDecodeError, KeyError, TypeError):
            result.findings.append(
                Finding(
                    "error",
                    "caption",
                    "bad-metadata",
                    where,
                    "not a JSON object with `file_name`",
                    'write {"file_name": "a.png", "text": "a caption"} per line',
                )
            )
            continue
        image = folder / name
        if not image.is_file():
            result.findings.append(
                Finding("error", "file", "missing-image", where, f"{name} does not exist", "fix the file name")
            )
            continue
        caption = next((str(record[k]).strip() for k in METADATA_CAPTION_KEYS if k in record), "")
        if not caption:
            result.findings.append(
                Finding(
                    "warning",
                    "caption",
                    "empty-caption",
                    where,
                    "no caption (text) for this image",
                    'add a "text" field',
                )
            )
        result.items.append(DatasetItem(image, caption, None, 1))
