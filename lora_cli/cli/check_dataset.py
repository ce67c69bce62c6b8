"""`lora-check-dataset FOLDER`: find what would spoil a training run before it starts."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from lora_cli.cli.errors import run_app
from lora_cli.errors import DatasetError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


@app.command(help="Check an image-caption folder: files, pixels, captions, duplicates, variety and buckets.")
def check(
    folder: Annotated[Path, typer.Argument(help="Dataset folder.", show_default=False)],
    resolution: Annotated[int, typer.Option("--resolution", min=8, help="Training resolution.")] = 512,
    caption_ext: Annotated[
        list[str] | None, typer.Option("--caption-ext", help="Caption extension (repeatable). Default: .txt, .caption")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Batch size, for thin-bucket checks.")] = 1,
    trigger: Annotated[str | None, typer.Option("--trigger", help="A word every caption must contain.")] = None,
    near_threshold: Annotated[
        int, typer.Option("--near-threshold", min=0, max=128, help="Near-duplicate distance in bits of 256.")
    ] = 10,
    tokenizer: Annotated[
        str | None, typer.Option("--tokenizer", help="A tokenizer folder or hub id, to check caption lengths.")
    ] = None,
    base: Annotated[
        str | None,
        typer.Option("--base", help="The base to train: count caption lengths with its own tokenizer and limit."),
    ] = None,
    upscale: Annotated[bool, typer.Option("--upscale", help="Buckets may upscale small images.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print every finding as JSON instead of tables.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 when there are warnings.")] = False,
    frames: Annotated[
        int | None, typer.Option("--frames", min=1, help="Check video clips of this many frames instead of images.")
    ] = None,
    fps: Annotated[
        float | None, typer.Option("--fps", min=0.001, help="With --frames: the training frame rate.")
    ] = None,
) -> None:
    from datasets_tools.check import CheckOptions, check_dataset
    from datasets_tools.clips import check_clips

    if not folder.is_dir():
        raise DatasetError(f"{folder}: no such folder; give the folder that holds the images")
    extensions = [_dotted(e) for e in caption_ext] if caption_ext else [".txt", ".caption"]
    count_tokens, max_tokens, counted_by = (
        _token_counter(tokenizer) if tokenizer else _base_counter(base) if base else (None, 77, "")
    )
    options = CheckOptions(
        resolution=resolution,
        caption_extensions=extensions,
        batch_size=batch_size,
        trigger=trigger,
        near_threshold=near_threshold,
        count_tokens=count_tokens,
        max_tokens=max_tokens,
        counted_by=counted_by,
        upscale=upscale,
    )
    report = check_clips(folder, frames, fps, extensions) if frames else check_dataset(folder, options)
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        from rich.console import Console

        from datasets_tools.report import render

        render(report, Console())
    if report.count("error"):
        sys.exit(2)
    if strict and report.count("warning"):
        sys.exit(1)


def _dotted(extension: str) -> str:
    return extension if extension.startswith(".") else f".{extension}"


def _token_counter(name: str):
    """Token count (start/end tokens included, as the limit counts them) and the tokenizer's limit."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"--tokenizer {name}: cannot load it ({str(exc).splitlines()[0]})") from None
    limit = min(int(tokenizer.model_max_length), 4096)
    return (lambda text: len(tokenizer(text).input_ids)), limit, f"counted by {name}"


def _base_counter(base: str):
    """The base's caption tokenizer and limit (T5 bases: their default token limit)."""
    from lora_cli.models.source import open_base_source
    from lora_cli.models.tokens import caption_token_counter

    with open_base_source(base, "--base") as source:
        counter = caption_token_counter(source)
    if counter is None:
        raise DatasetError(f"--base {base}: it has no tokenizer folder to count with; give --tokenizer instead")
    return counter


def main() -> None:
    run_app(app, "lora-check-dataset")
