"""Video training clips: short video files or folders of frames, each with a caption file beside it.

A clip `walk.mp4` (or a folder `walk/` of numbered frames) takes its caption from `walk.txt`. Clips are
read at `fps` (frames are dropped or repeated to resample; the clip's own rate when not given) and must
hold at least the training frame count from their start. Video files are decoded with PyAV.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from datasets_tools.check import Report
from datasets_tools.findings import Finding
from datasets_tools.scan import IMAGE_EXTENSIONS, DatasetItem

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")
FRAME_FOLDER_FPS = 16.0  # the rate assumed for folders of frames


@dataclass(frozen=True)
class ClipInfo:
    width: int
    height: int
    frames: int
    fps: float


def is_clip(path: Path) -> bool:
    return path.is_dir() or path.suffix.lower() in VIDEO_EXTENSIONS


def clip_info(path: Path) -> ClipInfo:
    """Size, frame count and rate of a clip (raises OSError/ValueError when it cannot be read)."""
    if path.is_dir():
        frames = _frame_files(path)
        if not frames:
            raise ValueError("the folder holds no image frames")
        with Image.open(frames[0]) as first:
            return ClipInfo(first.width, first.height, len(frames), FRAME_FOLDER_FPS)
    av = _pyav()
    with av.open(str(path)) as container:
        stream = _video_stream(container)
        rate = float(stream.average_rate or stream.guessed_rate or FRAME_FOLDER_FPS)
        count = stream.frames or sum(1 for _ in container.decode(stream))
        return ClipInfo(stream.codec_context.width, stream.codec_context.height, count, rate)


def read_clip(path: Path, frames: int, fps: float | None) -> list[Image.Image]:
    """The first `frames` frames of the clip resampled to `fps` (RGB)."""
    if path.is_dir():
        images, rate = _folder_frames(path), FRAME_FOLDER_FPS
    else:
        images, rate = _video_frames(path, frames, fps)
    step = rate / fps if fps else 1.0
    picked = [images[int(i * step)] for i in range(frames) if int(i * step) < len(images)]
    if len(picked) < frames:
        raise ValueError(f"{path}: {len(picked)} frames at {fps or rate:g} fps, {frames} needed")
    return picked


def check_clips(folder: str | Path, frames: int, fps: float | None, caption_extensions: list[str]) -> Report:
    """Find the clips of `folder` and check each can be read, is long enough and has a caption."""
    folder = Path(folder)
    report = Report(str(folder))
    if not folder.is_dir():
        report.findings.append(
            Finding("error", "folder", "missing-folder", str(folder), "dataset folder does not exist", "check the path")
        )
        return report
    for path in sorted(p for p in folder.iterdir() if not p.name.startswith(".") and is_clip(p)):
        caption_file = next((path.with_suffix(e) for e in caption_extensions if path.with_suffix(e).is_file()), None)
        try:
            info = clip_info(path)
        except (OSError, ValueError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            report.findings.append(Finding("error", "file", "unreadable-clip", str(path), reason[:200], "re-encode it"))
            continue
        available = int(info.frames * (fps / info.fps)) if fps else info.frames
        if available < frames:
            report.findings.append(
                Finding(
                    "error",
                    "file",
                    "short-clip",
                    str(path),
                    f"{available} frames at the training rate, {frames} needed",
                    "lower data.frames or data.fps, or remove the clip",
                )  # fmt: skip
            )
            continue
        caption = caption_file.read_text(encoding="utf-8", errors="replace").strip() if caption_file else ""
        if not caption:
            report.findings.append(
                Finding("warning", "caption", "missing-caption", str(path), "no caption", "add a .txt beside the clip")
            )
        report.items.append(DatasetItem(path, caption, caption_file, 1))
    report.images = len(report.items)
    if not report.items:
        report.findings.append(
            Finding(
                "error",
                "folder",
                "no-clips",
                str(folder),
                f"no clips found ({', '.join(VIDEO_EXTENSIONS)} or folders of frames)",
                "point at the folder that holds the clips",
            )  # fmt: skip
        )
    return report


def _frame_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def _folder_frames(folder: Path) -> list[Image.Image]:
    frames = []
    for path in _frame_files(folder):
        with Image.open(path) as image:
            frames.append(image.convert("RGB"))
    return frames


def _video_frames(path: Path, frames: int, fps: float | None) -> tuple[list[Image.Image], float]:
    """The video's frames from the start, decoding only as many as `frames` at `fps` need."""
    av = _pyav()
    with av.open(str(path)) as container:
        stream = _video_stream(container)
        rate = float(stream.average_rate or stream.guessed_rate or FRAME_FOLDER_FPS)
        needed = math.ceil(frames * (rate / fps if fps else 1.0))
        images = []
        for frame in container.decode(stream):
            images.append(frame.to_image().convert("RGB"))
            if len(images) >= needed:
                break
        return images, rate


def _video_stream(container):
    if not container.streams.video:
        raise ValueError("the file holds no video stream")
    return container.streams.video[0]


def _pyav():
    try:
        import av
    except ImportError:
        raise OSError("reading video files needs PyAV: pip install 'lora-cli[video]'") from None
    return av
