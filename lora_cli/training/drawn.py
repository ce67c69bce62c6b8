"""Images the frozen base draws for a run (prior/class images, a distillation teacher's data), as PNG + caption
pairs in a folder that later runs reuse.

Every process draws a share (image i from seed `seed + i` on any process) and the main process writes the
folder in one atomic step, with a marker that lists what was drawn; a folder without its marker is drawn again.
"""

from __future__ import annotations

import io
import json
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from lora_cli.io.atomic import atomic_directory
from lora_cli.io.safetensors_file import save_tensors
from lora_cli.models.base import LoadedBase


@dataclass(frozen=True)
class Drawing:
    """What to draw: image i is prompts[i] from seed `seed + i`."""

    prompts: list[str]
    seed: int
    steps: int
    guidance_scale: float | None  # None: the pipeline's default
    resolution: int
    keep_latents: bool = False  # also store each image's final latents (`{stem}_00000.safetensors`)


def marker(folder: Path, stem: str) -> Path:
    return folder / f"{stem}.json"


def is_complete(folder: Path, stem: str) -> bool:
    return marker(folder, stem).is_file()


def image_name(stem: str, index: int) -> str:
    return f"{stem}_{index:05d}.png"


def latent_path(image: Path) -> Path:
    """Where the final latents of a drawn image are kept (when the drawing keeps them)."""
    return image.with_suffix(".safetensors")


def draw_into_folder(
    base: LoadedBase, drawing: Drawing, folder: Path, stem: str, accelerator: Any = None, offload_blocks: int = 0
) -> None:
    """Draw `drawing` with the base into `folder` as `{stem}_00000.png` + `.txt`, ...; the marker `{stem}.json`
    records the drawing. With an `accelerator`, its processes share the work."""
    from lora_cli.sampling import generate_images
    from lora_cli.training.offload import offloaded_while_drawing

    prompts = drawing.prompts
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    mine = list(range(rank, len(prompts), world))
    offload = offload_blocks if accelerator is not None else 0
    latents: list[torch.Tensor] | None = [] if drawing.keep_latents else None
    with offloaded_while_drawing(base, offload, accelerator.device) if offload else nullcontext():
        if accelerator is not None:  # draw on the GPU; training moves the modules there next anyway
            for module in (base.denoiser, base.vae, *base.text_encoders.values()):
                module.to(accelerator.device)
        images = generate_images(
            base.architecture.build_pipeline(base),
            [prompts[i] for i in mine],
            [drawing.seed + i for i in mine],
            drawing.steps,
            drawing.guidance_scale,
            "",
            drawing.resolution,
            text_tokens=base.pipeline_extras.get("text_tokens"),
            final_latents=latents,
            guidance_parameter=base.architecture.cfg_parameter,
        )
    size = drawing.resolution
    if latents is not None:
        latents = [base.architecture.latents_from_pipeline(latent.float(), size, size)[0] for latent in latents]
    drawn = [
        (index, _png(image), latents[position] if latents is not None else None)
        for position, (index, image) in enumerate(zip(mine, images, strict=True))
    ]
    if accelerator is not None and world > 1:
        from accelerate.utils import gather_object

        drawn = gather_object(drawn)
    if rank == 0:
        with atomic_directory(folder) as tmp:
            for index, png, latent in sorted(drawn, key=lambda entry: entry[0]):
                (tmp / image_name(stem, index)).write_bytes(png)
                if latent is not None:
                    save_tensors(latent_path(tmp / image_name(stem, index)), {"latent": latent}, {})
                (tmp / image_name(stem, index)).with_suffix(".txt").write_text(prompts[index] + "\n", encoding="utf-8")
            marker(tmp, stem).write_text(json.dumps({**asdict(drawing), "count": len(prompts)}))
    if accelerator is not None:
        accelerator.wait_for_everyone()  # the others read what the main process wrote


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
