"""A distillation run's data drawn by its teacher: `distill.teacher_images` images per prompt (from
`distill.prompts` or the dataset's captions), drawn by the frozen base before any adapter exists.

They are kept under `output.dir/teacher/<key>/` (keyed by the base fingerprint and the drawing settings, so
later runs reuse them and an interrupted run draws them again) and trained on like the dataset's images. Image
i was drawn from seed `distill.teacher_seed + i`, so its starting noise can be drawn again: reflow trains on
exactly those (noise, image) pairs.
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
from lora_cli.training.drawn import Drawing, draw_into_folder, image_name, is_complete, latent_path

STEM = "teacher"
MAX_PROMPT_FILE_BYTES = 1 << 20


def teacher_prompts(preset: Preset, dataset_items: list[DatasetItem]) -> list[str]:
    """The prompts the teacher draws: the prompts file's lines, else the dataset's distinct captions."""
    source = preset.distill.prompts
    if source is None:
        return sorted({item.caption for item in dataset_items if item.caption})
    return read_prompts_file(Path(source), "distill.prompts")


def read_prompts_file(path: Path, option: str) -> list[str]:
    """The non-empty lines of a UTF-8 prompts file named by `option`, refused in one line when it is not one."""
    if not path.is_file():
        raise DatasetError(f"{option}: {path} is not a file; give a text file with one prompt per line")
    if path.stat().st_size > MAX_PROMPT_FILE_BYTES:
        raise DatasetError(f"{option}: {path} is larger than 1 MiB; is it a prompts file?")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DatasetError(f"{option}: {path} is not UTF-8 text; save it as UTF-8") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise DatasetError(f"{option}: {path} holds no prompts; write one prompt per line")
    return prompts


def teacher_drawing(preset: Preset, prompts: list[str], keep_latents: bool) -> Drawing:
    distill = preset.distill
    per_prompt = [prompt for prompt in prompts for _ in range(distill.teacher_images)]
    return Drawing(per_prompt, distill.teacher_seed, distill.teacher_steps, distill.teacher_guidance,
                   preset.data.resolution, keep_latents=keep_latents)  # fmt: skip


def teacher_folder(preset: Preset, base: LoadedBase, run_root: Path, drawing: Drawing) -> Path:
    settings = {"base": base.identity.fingerprint, "drawing": drawing.__dict__}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return run_root / STEM / key


def teacher_items(
    preset: Preset,
    base: LoadedBase,
    run_root: Path,
    dataset_items: list[DatasetItem],
    generate: bool,
    accelerator: Any = None,
) -> tuple[list[DatasetItem], list[int]]:
    """The teacher's images as dataset items, with the seed each was drawn from (empty when none are asked for,
    and when `generate` is False and they are not drawn yet)."""
    if not preset.distill.teacher_images:
        return [], []
    # Reflow (flow bases) trains on the exact latents each image was drawn as, not on its re-encoding.
    drawing = teacher_drawing(preset, teacher_prompts(preset, dataset_items), base.architecture.flow_matching)
    folder = teacher_folder(preset, base, run_root, drawing)
    if not is_complete(folder, STEM):
        if not generate:
            return [], []
        draw_into_folder(base, drawing, folder, STEM, accelerator, preset.train.offload_blocks)
    result = scan_folder(folder, [".txt"])
    if result.errors:
        first = result.errors[0]
        raise DatasetError(f"{folder}: {first.file}: {first.reason}; delete the folder to draw it again")
    by_name = {item.image.name: item for item in result.items}
    names = [image_name(STEM, index) for index in range(len(drawing.prompts))]
    kept = all(latent_path(folder / name).is_file() for name in names) if drawing.keep_latents else True
    if set(names) != set(by_name) or not kept:
        raise DatasetError(f"{folder}: the teacher's images are incomplete; delete the folder to draw them again")
    return [by_name[name] for name in names], [drawing.seed + index for index in range(len(names))]
