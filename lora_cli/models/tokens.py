"""How many tokens of a caption a base's text encoder reads: the tokenizer that bounds it and its limit."""

from __future__ import annotations

from collections.abc import Callable

from lora_cli.models.source import BaseSource

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
