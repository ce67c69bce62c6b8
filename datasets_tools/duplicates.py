"""Exact duplicates (identical pixels) and near-duplicates (resized, re-compressed, lightly cropped or
colour-shifted copies) grouped into clusters.

A near-duplicate needs two signs: a luminance difference hash within `threshold` bits (the structure), and
colours that agree wherever both pictures are flat (a red square and a green square share their structure, so
their hashes agree; a colour shift of a few percent keeps the colours within `COLOUR_THRESHOLD`). Measured on
`lora_cli.toy.graphics.corpus` (docs/dataset-check.md); tests/test_duplicates.py gates the numbers.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from datasets_tools.images import THUMB_SIDE

DEFAULT_NEAR_THRESHOLD = 10  # differing bits of the 256-bit difference hash
COLOUR_THRESHOLD = 50.0  # largest RGB distance (of 441) between flat thumbnail pixels of two copies
FLAT_RANGE = 30  # a thumbnail pixel is flat when its 3x3 neighbourhood varies by less than this per channel


def exact_clusters(hashes: dict[str, str]) -> list[list[str]]:
    """Groups of files whose decoded pixels are identical (any names, any formats)."""
    groups: dict[str, list[str]] = defaultdict(list)
    for path, digest in hashes.items():
        groups[digest].append(path)
    return [sorted(files) for files in groups.values() if len(files) > 1]


def near_clusters(
    hashes: dict[str, tuple[bytes, bytes]], threshold: int, thumbs: dict[str, tuple[bytes, bytes]] | None = None
) -> list[list[str]]:
    """Connected groups of images within `threshold` bits — whole vs whole, or one's centre vs the other whole
    (a lightly cropped copy looks like the original's centre) — whose colours agree on the same alignment."""
    paths = sorted(hashes)
    if len(paths) < 2:
        return []
    full = np.array([np.frombuffer(hashes[p][0], dtype=np.uint8) for p in paths])
    center = np.array([np.frombuffer(hashes[p][1], dtype=np.uint8) for p in paths])
    parent = list(range(len(paths)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def bits(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.unpackbits(np.bitwise_xor(a, b), axis=1).sum(axis=1)

    for i in range(len(paths) - 1):
        later_full, later_center = full[i + 1 :], center[i + 1 :]
        # which alignment each pair matches best: 0 whole/whole, 1 this whole/other centre, 2 this centre/other whole
        distances = np.stack([bits(later_full, full[i]), bits(later_center, full[i]), bits(later_full, center[i])])
        for j in np.nonzero(distances.min(axis=0) <= threshold)[0]:
            other = i + 1 + int(j)
            if thumbs is None or same_colours(thumbs[paths[i]], thumbs[paths[other]], int(distances[:, j].argmin())):
                parent[root(other)] = root(i)
    clusters: dict[int, list[str]] = defaultdict(list)
    for i, path in enumerate(paths):
        clusters[root(i)].append(path)
    return [files for files in clusters.values() if len(files) > 1]


def same_colours(first: tuple[bytes, bytes], second: tuple[bytes, bytes], alignment: int) -> bool:
    """Whether two thumbnails (whole, centre) agree in colour where both are flat, on the hash's alignment."""
    a = _pixels(first[0] if alignment in (0, 1) else first[1])
    b = _pixels(second[1] if alignment == 1 else second[0])
    flat = _flat(a) & _flat(b)
    if not flat.any():  # nothing flat to compare (photographs): the structure decides
        return True
    return float(np.sqrt(((a - b) ** 2).sum(axis=-1))[flat].max()) <= COLOUR_THRESHOLD


def _pixels(thumb: bytes) -> np.ndarray:
    return np.frombuffer(thumb, dtype=np.uint8).reshape(THUMB_SIDE, THUMB_SIDE, 3).astype(np.float32)


def _flat(pixels: np.ndarray) -> np.ndarray:
    padded = np.pad(pixels, ((1, 1), (1, 1), (0, 0)), mode="edge")
    side = pixels.shape[0]
    around = np.stack([padded[dy : dy + side, dx : dx + side] for dy in range(3) for dx in range(3)])
    return (around.max(axis=0) - around.min(axis=0)).max(axis=-1) < FLAT_RANGE
