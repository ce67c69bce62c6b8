"""Prior preservation (DreamBooth-style regularisation): class images from a folder or drawn by the base.

Generated images are drawn by every process (a share each) and written once, by the main process, under
`output.dir/prior/<key>/` as PNG + caption pairs, keyed by the base fingerprint and the generation settings,
so later runs reuse them and `lora-check-dataset` can inspect them.
"""

from __future__ import annotations

import hashlib
import io
import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from PIL import Image

from datasets_tools.scan import DatasetItem, scan_folder
from lora_cli.config.schema import Preset
from lora_cli.errors import DatasetError
from lora_cli.io.atomic import atomic_directory
from lora_cli.models.base import LoadedBase

COMPLETE_MARKER = "prior.json"


def prior_items(
    preset: Preset, base: LoadedBase, run_root: Path, generate: bool, accelerator: Any = None
) -> list[DatasetItem]:
    """Class images for the run; generation is skipped (and counted as planned) when `generate` is False.
    With an `accelerator`, every process draws a share of the images and the main process writes them all."""
    prior = preset.prior
    items: list[DatasetItem] = []
    if prior.folder is not None:
        items += _scan(Path(prior.folder), preset.data.caption_extensions)
    if prior.prompts:
        folder = generated_folder(preset, base, run_root)
        if not (folder / COMPLETE_MARKER).is_file():
            if not generate:
                return items
            _generate(preset, base, folder, accelerator)
        items += _scan(folder, [".txt"])
    return items


def generated_folder(preset: Preset, base: LoadedBase, run_root: Path) -> Path:
    prior = preset.prior
    settings = {
        "base": base.identity.fingerprint,
        "prompts": prior.prompts,
        "per_prompt": prior.images_per_prompt,
        "steps": prior.steps,
        "guidance": prior.guidance_scale,
        "seed": prior.seed,
        "resolution": preset.data.resolution,
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return run_root / "prior" / key


def _generate(preset: Preset, base: LoadedBase, folder: Path, accelerator: Any) -> None:
    from lora_cli.sampling import generate_images
    from lora_cli.training.offload import offloaded_while_drawing

    prior = preset.prior
    prompts = [prompt for prompt in prior.prompts for _ in range(prior.images_per_prompt)]
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    mine = list(range(rank, len(prompts), world))  # image i is drawn from seed prior.seed + i on any process
    offload = preset.train.offload_blocks if accelerator is not None else 0
    with offloaded_while_drawing(base, offload, accelerator.device) if offload else nullcontext():
        if accelerator is not None:  # draw on the GPU; training moves the modules there next anyway
            for module in (base.denoiser, base.vae, *base.text_encoders.values()):
                module.to(accelerator.device)
        images = generate_images(
            base.architecture.build_pipeline(base),
            [prompts[i] for i in mine],
            [prior.seed + i for i in mine],
            prior.steps,
            prior.guidance_scale,
            "",
            preset.data.resolution,
            text_tokens=base.pipeline_extras.get("text_tokens"),
        )
    drawn = [(index, _png(image)) for index, image in zip(mine, images, strict=True)]
    if accelerator is not None and world > 1:
        from accelerate.utils import gather_object

        drawn = gather_object(drawn)
    if rank == 0:
        with atomic_directory(folder) as tmp:
            for index, png in sorted(drawn):
                (tmp / f"prior_{index:05d}.png").write_bytes(png)
                (tmp / f"prior_{index:05d}.txt").write_text(prompts[index] + "\n", encoding="utf-8")
            (tmp / COMPLETE_MARKER).write_text(json.dumps({"prompts": prior.prompts, "count": len(prompts)}))
    if accelerator is not None:
        accelerator.wait_for_everyone()  # the others read what the main process wrote


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _scan(folder: Path, caption_extensions: list[str]) -> list[DatasetItem]:
    result = scan_folder(folder, caption_extensions)
    if result.errors:
        first = result.errors[0]
        raise DatasetError(f"prior.folder: {first.file}: {first.reason}; {first.fix}")
    return result.items
