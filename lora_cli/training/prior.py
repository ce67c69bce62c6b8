"""Prior preservation (DreamBooth-style regularisation): class images from a folder or drawn by the base.

Generated images are drawn as `training/drawn.py` draws (every process a share, the main process writes) under
`output.dir/prior/<key>/`, keyed by the base fingerprint and the generation settings, so later runs reuse them
and `lora-check-dataset` can inspect them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from datasets_tools.scan import DatasetItem, scan_folder
from lora_cli.config.schema import Preset
from lora_cli.errors import DatasetError
from lora_cli.models.base import LoadedBase
from lora_cli.training.drawn import Drawing, draw_into_folder, is_complete


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
        if not is_complete(folder, "prior"):
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
    prior = preset.prior
    prompts = [prompt for prompt in prior.prompts for _ in range(prior.images_per_prompt)]
    drawing = Drawing(prompts, prior.seed, prior.steps, prior.guidance_scale, preset.data.resolution)
    draw_into_folder(base, drawing, folder, "prior", accelerator, preset.train.offload_blocks)


def _scan(folder: Path, caption_extensions: list[str]) -> list[DatasetItem]:
    result = scan_folder(folder, caption_extensions)
    if result.errors:
        first = result.errors[0]
        raise DatasetError(f"prior.folder: {first.file}: {first.reason}; {first.fix}")
    return result.items
