"""Exact duplicates (identical pixels) and near-duplicates (resized, re-compressed, lightly cropped copies)
grouped into clusters."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

DEFAULT_NEAR_THRESHOLD = 10  # differing bits of the 256-bit difference hash


def exact_clusters(hashes: dict[str, str]) -> list[list[str]]:
    """Groups of files whose decoded pixels are identical (any names, any formats)."""
    groups: dict[str, list[str]] = defaultdict(list)
    for path, digest in hashes.items():
        groups[digest].append(path)
    return [sorted(files) for files in groups.values() if len(files) > 1]


def near_clusters(hashes: dict[str, tuple[bytes, bytes]], threshold: int) -> list[list[str]]:
    """Connected groups of images within `threshold` bits: whole vs whole, or one's centre vs the other whole
    (a lightly cropped copy looks like the original's centre)."""
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
        distance = np.minimum(
            bits(later_full, full[i]), np.minimum(bits(later_full, center[i]), bits(later_center, full[i]))
        )
        for j in np.nonzero(distance <= threshold)[0]:
            parent[root(i + 1 + int(j))] = root(i)
    clusters: dict[int, list[str]] = defaultdict(list)
    for i, path in enumerate(paths):
        clusters[root(i)].append(path)
    return [files for files in clusters.values() if len(files) > 1]
