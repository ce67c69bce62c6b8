"""Captions as tokens: the padded ids a text encoder reads (each caption tokenized once), and how many tokens
of a caption a base's text encoder reads (the tokenizer that bounds it and its limit)."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from lora_cli.models.source import BaseSource

CACHED_CAPTIONS = 16_384  # per tokenizer; tag shuffling makes new captions every step, so the cache is bounded
_padded: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {(caption, length): rows}


def padded_tokens(tokenizer: Any, captions: list[str], length: int, device: torch.device) -> Any:
    """Token ids (and attention mask) [B, length], padded and cut to `length`, on `device`. Training reads the
    same captions every epoch, so each is tokenized once per tokenizer and length."""
    from transformers import BatchEncoding

    known = _padded.setdefault(tokenizer, {})
    missing = [caption for caption in dict.fromkeys(captions) if (caption, length) not in known]
    if missing:
        if len(known) + len(missing) > CACHED_CAPTIONS:
            known.clear()
        batch = tokenizer(missing, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        for index, caption in enumerate(missing):
            known[(caption, length)] = {name: values[index] for name, values in batch.items()}
    rows = [known[(caption, length)] for caption in captions]
    return BatchEncoding({name: torch.stack([row[name] for row in rows]) for name in rows[0]}).to(device)


TokenCounter = tuple[Callable[[str], int], int, str]  # count(caption), the limit, which tokenizer counts


def caption_token_counter(source: BaseSource, max_text_tokens: int | None = None) -> TokenCounter | None:
    """The base's caption tokenizer (CLIP for the SD family, T5 for the DiTs that read T5) and its limit
    (`model.max_text_tokens` for T5, else the architecture's default or the tokenizer's own); None when the
    base has no tokenizer folder (a single-file checkpoint)."""
    from transformers import AutoTokenizer

    architecture = source.architecture
    folder = source.location / architecture.caption_tokenizer
    if source.is_single_file or not folder.is_dir():
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        return None
    default = getattr(architecture, "default_text_tokens", None)
    limit = max_text_tokens or default or min(int(tokenizer.model_max_length), 4096)
    return (
        (lambda text: len(tokenizer(text).input_ids)),
        limit,
        f"counted by the base's {architecture.caption_tokenizer}",
    )
