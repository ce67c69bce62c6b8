"""The whole pre-flight check of a dataset folder: files, pixels, captions, duplicates, variety, buckets.

Never modifies the dataset. Images are inspected in parallel worker processes; memory stays flat because
each worker returns a small summary per image.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from datasets_tools.buckets import assign_bucket, bucket_step, make_buckets
from datasets_tools.captions import caption_findings
from datasets_tools.duplicates import DEFAULT_NEAR_THRESHOLD, exact_clusters, near_clusters
from datasets_tools.findings import SEVERITY_ORDER, Finding
from datasets_tools.images import ImageInfo, inspect_image
from datasets_tools.scan import DatasetItem, scan_folder

MIN_IMAGES = 5  # below this a run is refused
RECOMMENDED_IMAGES = 15
NEAR_DUPLICATE_SHARE = 0.3
PARALLEL_FROM = 64  # smaller folders are checked in-process (starting workers costs more)


@dataclass
class CheckOptions:
    resolution: int = 512
    caption_extensions: list[str] = field(default_factory=lambda: [".txt", ".caption"])
    batch_size: int = 1
    trigger: str | None = None
    near_threshold: int = DEFAULT_NEAR_THRESHOLD
    count_tokens: Callable[[str], int] | None = None  # None: estimated (datasets_tools.captions.estimate_tokens)
    max_tokens: int = 77  # CLIP's limit, the SD family's; a base's own limit when its tokenizer counts
    counted_by: str = ""  # which tokenizer counts, for messages
    upscale: bool = False
    workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))


@dataclass
class Report:
    folder: str
    items: list[DatasetItem] = field(default_factory=list)
    images: int = 0
    findings: list[Finding] = field(default_factory=list)
    exact_duplicates: list[list[str]] = field(default_factory=list)
    near_duplicates: list[list[str]] = field(default_factory=list)
    buckets: dict[str, int] = field(default_factory=dict)
    resolutions: dict[str, int] = field(default_factory=dict)
    aspect_ratios: dict[str, int] = field(default_factory=dict)

    def count(self, severity: str) -> int:
        return sum(1 for f in self.findings if f.severity == severity)

    def of(self, severity: str) -> list[Finding]:
        return [f for f in self.findings if f.severity == severity]

    def to_json(self) -> dict:
        return {
            "folder": self.folder,
            "images": self.images,
            "counts": {s: self.count(s) for s in SEVERITY_ORDER},
            "findings": [f.to_json() for f in self.findings],
            "exact_duplicates": self.exact_duplicates,
            "near_duplicates": self.near_duplicates,
            "buckets": self.buckets,
            "resolutions": self.resolutions,
            "aspect_ratios": self.aspect_ratios,
        }


def check_dataset(folder: str | Path, options: CheckOptions) -> Report:
    scan = scan_folder(folder, options.caption_extensions)
    report = Report(str(folder), items=scan.items, images=len(scan.items), findings=list(scan.findings))
    if not scan.items:
        return _sorted(report)
    infos = _inspect_all([str(item.image) for item in scan.items], options)
    good = [info for info in infos if info.ok]
    for info in infos:
        report.findings += info.findings
    report.findings += caption_findings(
        scan.items, options.trigger, options.count_tokens, options.max_tokens, options.counted_by
    )
    _duplicates(report, good, options.near_threshold)
    _variety(report, len(good))
    _buckets(report, good, options)
    _histograms(report, good)
    return _sorted(report)


def _inspect_all(paths: list[str], options: CheckOptions) -> list[ImageInfo]:
    inspect = partial(inspect_image, resolution=options.resolution, upscale=options.upscale)
    if len(paths) < PARALLEL_FROM or options.workers <= 1:
        return [inspect(path) for path in paths]
    with ProcessPoolExecutor(options.workers) as pool:
        return list(pool.map(inspect, paths, chunksize=32))


def _duplicates(report: Report, infos: list[ImageInfo], threshold: int) -> None:
    report.exact_duplicates = exact_clusters({i.path: i.pixel_hash for i in infos})
    exact_members = {path for cluster in report.exact_duplicates for path in cluster[1:]}
    remaining = {i.path: (i.dhash, i.dhash_center) for i in infos if i.path not in exact_members}
    thumbs = {i.path: (i.thumb, i.thumb_center) for i in infos}
    report.near_duplicates = near_clusters(remaining, threshold, thumbs)
    for kind, clusters in (("exact-duplicate", report.exact_duplicates), ("near-duplicate", report.near_duplicates)):
        for cluster in clusters:
            others = ", ".join(Path(p).name for p in cluster[1:])
            report.findings.append(
                Finding(
                    "warning",
                    "duplicate",
                    kind,
                    cluster[0],
                    f"{len(cluster)} copies: also {others}",
                    "keep one, or caption each differently if they really differ",
                )
            )
    in_near = sum(len(c) for c in report.near_duplicates + report.exact_duplicates)
    if infos and in_near / len(infos) >= NEAR_DUPLICATE_SHARE:
        report.findings.append(
            Finding(
                "warning",
                "variety",
                "duplicate-share",
                report.folder,
                f"{in_near} of {len(infos)} images are copies of each other",
                "remove copies; they overweight a few pictures",
            )
        )


def _variety(report: Report, usable: int) -> None:
    if usable < MIN_IMAGES:
        report.findings.append(
            Finding(
                "error",
                "variety",
                "too-few",
                report.folder,
                f"only {usable} usable images (minimum {MIN_IMAGES})",
                f"add images; {RECOMMENDED_IMAGES}+ varied ones work well",
            )
        )
    elif usable < RECOMMENDED_IMAGES:
        report.findings.append(
            Finding(
                "warning",
                "variety",
                "few",
                report.folder,
                f"{usable} usable images",
                f"{RECOMMENDED_IMAGES}+ varied images generalise better",
            )
        )


def _buckets(report: Report, infos: list[ImageInfo], options: CheckOptions) -> None:
    buckets, step = make_buckets(options.resolution), bucket_step(options.resolution)
    counts: Counter[str] = Counter()
    for info in infos:
        assignment = assign_bucket(info.width, info.height, buckets, step, options.upscale)
        counts[f"{assignment.width}x{assignment.height}"] += 1
        if assignment.crop_fraction > 0.25:
            report.findings.append(
                Finding(
                    "info",
                    "bucket",
                    "heavy-crop",
                    info.path,
                    f"{assignment.crop_fraction:.0%} cut away in bucket {assignment.width}x{assignment.height}",
                    "crop it yourself to keep the part that matters",
                )
            )
    report.buckets = dict(sorted(counts.items()))
    for bucket, count in counts.items():
        if count < options.batch_size:
            report.findings.append(
                Finding(
                    "warning",
                    "bucket",
                    "thin-bucket",
                    bucket,
                    f"only {count} image(s) for batch size {options.batch_size}; batches here run short",
                    "add images of this aspect ratio, crop them to a common one, or lower the batch size",
                )
            )


def _histograms(report: Report, infos: list[ImageInfo]) -> None:
    sizes: Counter[str] = Counter()
    ratios: Counter[str] = Counter()
    for info in infos:
        side = min(info.width, info.height)
        band = next((f"<{b}" for b in (256, 512, 768, 1024, 2048) if side < b), ">=2048")
        sizes[band] += 1
        ratios[f"{info.width / info.height:.2f}".rstrip("0").rstrip(".")] += 1
    report.resolutions = dict(sorted(sizes.items()))
    report.aspect_ratios = dict(ratios.most_common(12))


def _sorted(report: Report) -> Report:
    report.findings.sort(key=lambda f: (SEVERITY_ORDER[f.severity], f.category, f.file))
    return report
