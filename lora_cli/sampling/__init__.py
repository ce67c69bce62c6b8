"""Images from a pipeline with fixed seeds, labelled grids of them, and `lora-sample` behind them."""

from __future__ import annotations

from collections.abc import Callable
from inspect import signature
from typing import Any

from PIL import Image, ImageDraw

from lora_cli.errors import SamplingError

BATCH = 16
MIN_CELL = 96


def pipeline_default(pipeline: Any, parameter: str) -> Any:
    """The pipeline's own default for a call parameter (diffusers sets them per architecture: Flux's embedded
    guidance 3.5 and 28 steps, SD's classifier-free guidance 7.5 and 50 steps, ...); None if it has none."""
    found = signature(pipeline.__call__).parameters.get(parameter)
    return None if found is None or found.default is found.empty else found.default


def generate_images(
    pipeline: Any,
    prompts: list[str],
    seeds: list[int],
    steps: int | None,
    guidance_scale: float | None,
    negative_prompt: str,
    size: int,
    on_batch: Callable[[int], object] | None = None,
    frames: int | None = None,
    text_tokens: int | None = None,
    final_latents: list[Any] | None = None,
    guidance_parameter: str = "guidance_scale",
) -> list[Image.Image]:
    """Image i draws prompts[i] from seeds[i]; batched, and the same arguments always give the same images.
    `steps` and `guidance_scale` left None take the pipeline's defaults; `text_tokens` is the T5 sequence length
    for pipelines that take one (what the adapter was trained with). Video pipelines draw `frames` frames,
    returned as one strip image per video (frames left to right). `final_latents`, when given, receives each
    image's latents after the last step, as the pipeline holds them ([1, ...] each). `guidance_parameter` is the
    call parameter `guidance_scale` sets (the architecture's `cfg_parameter`: Qwen-Image's `true_cfg_scale`)."""
    import torch

    pipeline.set_progress_bar_config(disable=True)
    accepted = signature(pipeline.__call__).parameters
    # PixArt's pipeline snaps sizes to its training bins by default; lora-cli draws exactly the size asked.
    options: dict[str, Any] = {"use_resolution_binning": False} if "use_resolution_binning" in accepted else {}
    if "enable_prompt_rewrite" in accepted:  # LongCat-Image rewrites captions with its LLM unless told not to
        options["enable_prompt_rewrite"] = False
    if frames is not None and "num_frames" in accepted:
        options["num_frames"] = frames
    if text_tokens is not None and "max_sequence_length" in accepted:
        options["max_sequence_length"] = text_tokens
    if steps is not None:
        options["num_inference_steps"] = steps
    if guidance_scale is not None:
        options[guidance_parameter] = guidance_scale
    # true CFG runs only with a negative prompt; " " is the one Qwen-Image's own examples use
    negative_prompt = negative_prompt or (" " if guidance_parameter == "true_cfg_scale" else "")
    if negative_prompt and "negative_prompt" not in accepted:
        raise SamplingError(
            f"{type(pipeline).__name__} takes no negative prompt (it draws with its own empty one); leave it out"
        )
    latest: dict[str, Any] = {}

    def watch(step: int, latents: Any) -> None:
        """Stop at the first non-finite step (it would decode to a black image); keep the last latents."""
        if not torch.isfinite(latents).all():
            raise SamplingError(
                f"the latents became non-finite at denoising step {step + 1}: the adapters' scales push the model "
                "out of range, or the scheduler cannot draw in this few steps (give more --steps)"
            )
        if final_latents is not None:
            latest["latents"] = latents.detach().cpu()

    if "callback_on_step_end" in accepted:
        options.update(
            callback_on_step_end=lambda pipe, step, timestep, tensors: watch(step, tensors["latents"]) or tensors,
            callback_on_step_end_tensor_inputs=["latents"],
        )
    elif "callback" in accepted:  # PixArt's older per-step callback
        options.update(callback=lambda step, timestep, latents: watch(step, latents), callback_steps=1)
    elif final_latents is not None:
        raise SamplingError(f"{type(pipeline).__name__} has no step callback to hand back its final latents")
    images: list[Image.Image] = []
    for start in range(0, len(prompts), BATCH):
        chunk = prompts[start : start + BATCH]
        generators = [torch.Generator().manual_seed(seed) for seed in seeds[start : start + BATCH]]
        if negative_prompt:  # otherwise each pipeline's own default (None, or "" for PixArt)
            options["negative_prompt"] = [negative_prompt] * len(chunk)
        result = pipeline(prompt=chunk, height=size, width=size, generator=generators, **options)
        images += result.images if hasattr(result, "images") else [frame_strip(video) for video in result.frames]
        if final_latents is not None:
            final_latents += list(latest.pop("latents").split(1))
        if on_batch is not None:
            on_batch(len(chunk))
    return images


def frame_strip(video: Any) -> Image.Image:
    """A video (frames as PIL images, or H x W x 3 floats in [0, 1], as pipelines return them by default) as one
    image of its frames side by side."""
    import numpy as np

    frames = [
        np.asarray(frame.convert("RGB"))
        if isinstance(frame, Image.Image)
        else (np.clip(np.asarray(frame, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8)
        for frame in video
    ]
    return Image.fromarray(np.concatenate(frames, axis=1))


def image_grid(rows: list[list[Image.Image]], row_labels: list[str], column_labels: list[str]) -> Image.Image:
    """Images in a grid with a label above each column and at the left of each row (small images enlarged)."""
    scale = max(1, MIN_CELL // rows[0][0].width)
    rows = [
        [image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST) for image in row]
        for row in rows
    ]
    cell_w, cell_h = rows[0][0].size
    label_w = max(80, 7 * max((len(label) for label in row_labels), default=0))
    label_h = 16
    grid = Image.new("RGB", (label_w + cell_w * len(column_labels), label_h + cell_h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for column, label in enumerate(column_labels):
        draw.text((label_w + column * cell_w + 2, 2), label, fill="black")
    for row, (label, images) in enumerate(zip(row_labels, rows, strict=True)):
        draw.text((2, label_h + row * cell_h + cell_h // 2 - 5), label, fill="black")
        for column, image in enumerate(images):
            grid.paste(image, (label_w + column * cell_w, label_h + row * cell_h))
    return grid
