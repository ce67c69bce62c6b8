"""One line of a memory breakdown."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Part:
    """One line of a breakdown. `file_pages`: pages of a memory-mapped weights file read once (to quantize it, or
    on its way to the GPU); resident RAM while mapped, but the kernel drops them when RAM runs short, so they are
    not part of what must fit."""

    name: str
    bytes: int
    file_pages: bool = False


def needed(parts: tuple[Part, ...]) -> int:
    """What must fit: every part but file pages the kernel can drop."""
    return sum(part.bytes for part in parts if not part.file_pages)


def resident(parts: tuple[Part, ...]) -> int:
    """What RSS may show: every part, file pages included."""
    return sum(part.bytes for part in parts)
