"""Checks over all captions together: shared captions, token limits, trigger words, dominant tokens."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable

from datasets_tools.findings import Finding
from datasets_tools.scan import DatasetItem

SHARED_CAPTION_MIN = 3
DOMINANT_SHARE = 0.9
STOPWORDS = {"a", "an", "the", "of", "and", "with", "in", "on", "at", "photo", "picture", "image", "to", "is"}


def caption_findings(
    items: list[DatasetItem], trigger: str | None, count_tokens: Callable[[str], int] | None, max_tokens: int
) -> list[Finding]:
    findings: list[Finding] = []
    captioned = [item for item in items if item.caption]
    shared = Counter(item.caption for item in captioned)
    for caption, count in shared.items():
        if count >= SHARED_CAPTION_MIN and count < len(captioned):
            findings.append(
                Finding(
                    "info",
                    "caption",
                    "shared-caption",
                    caption,
                    f"the same caption on {count} images",
                    "describe what differs between them (pose, background, lighting)",
                )
            )
    for item in captioned:
        where = str(item.caption_file or item.image)
        if trigger and not re.search(rf"\b{re.escape(trigger)}\b", item.caption, flags=re.IGNORECASE):
            findings.append(
                Finding(
                    "warning",
                    "caption",
                    "trigger-missing",
                    where,
                    f"no trigger word `{trigger}`",
                    f"add `{trigger}` to the caption",
                )
            )
        if count_tokens is not None:
            tokens = count_tokens(item.caption)
            if tokens > max_tokens:
                findings.append(
                    Finding(
                        "warning",
                        "caption",
                        "too-long",
                        where,
                        f"{tokens} tokens; the text encoder reads {max_tokens}, the rest is cut",
                        "shorten the caption or move key words to the front",
                    )
                )
    findings += _dominant_tokens(captioned, trigger)
    return findings


def _dominant_tokens(items: list[DatasetItem], trigger: str | None) -> list[Finding]:
    if len(items) < 5:
        return []
    documents = Counter()
    for item in items:
        documents.update({word for word in re.findall(r"[\w']+", item.caption.lower()) if word not in STOPWORDS})
    findings = []
    for word, count in documents.most_common(3):
        share = count / len(items)
        if share >= DOMINANT_SHARE and word != (trigger or "").lower():
            findings.append(
                Finding(
                    "info",
                    "variety",
                    "dominant-token",
                    word,
                    f"`{word}` is in {share:.0%} of captions",
                    "fine for one subject; otherwise vary the data so the adapter does not bind to it",
                )
            )
    return findings
