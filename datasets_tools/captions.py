"""Checks over all captions together: shared captions, token limits, trigger words, dominant tokens."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

from datasets_tools.findings import Finding
from datasets_tools.scan import DatasetItem

SHARED_CAPTION_MIN = 3
SHOWN_FILES = 5  # files a shared-caption finding names before counting the rest
DOMINANT_SHARE = 0.9
STOPWORDS = {"a", "an", "the", "of", "and", "with", "in", "on", "at", "photo", "picture", "image", "to", "is"}


def estimate_tokens(caption: str) -> int:
    """A tokenizer-free estimate for CLIP-style limits: one token per word and per punctuation mark, plus the
    start and end tokens. BPE splits rare and long words further, so the true count is at least this."""
    return 2 + len(re.findall(r"\w+|[^\w\s]", caption))


def caption_findings(
    items: list[DatasetItem],
    trigger: str | None,
    count_tokens: Callable[[str], int] | None,
    max_tokens: int,
    counted_by: str = "",
) -> list[Finding]:
    """Findings over every caption. Lengths are counted with `count_tokens` (described by `counted_by`), or
    estimated with `estimate_tokens` against `max_tokens` when no tokenizer is given."""
    findings: list[Finding] = []
    captioned = [item for item in items if item.caption]
    sharing: dict[str, list[DatasetItem]] = defaultdict(list)
    for item in captioned:
        sharing[item.caption].append(item)
    for caption, owners in sharing.items():
        if SHARED_CAPTION_MIN <= len(owners) < len(captioned):
            names = [Path(item.image).name for item in owners]
            listed = ", ".join(names[:SHOWN_FILES]) + (
                f" (+{len(names) - SHOWN_FILES} more)" if len(names) > SHOWN_FILES else ""
            )
            shown = caption if len(caption) <= 60 else caption[:57] + "..."
            findings.append(
                Finding(
                    "info",
                    "caption",
                    "shared-caption",
                    str(owners[0].image),
                    f'the caption "{shown}" is on {len(owners)} images: {listed}',
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
        tokens = (count_tokens or estimate_tokens)(item.caption)
        if tokens > max_tokens:
            how = counted_by if count_tokens else "estimated from words and punctuation; --base counts exactly"
            findings.append(
                Finding(
                    "warning",
                    "caption",
                    "too-long",
                    where,
                    f"{'' if count_tokens else 'about '}{tokens} tokens ({how}); the text encoder reads {max_tokens}, "
                    "the rest is cut",
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
