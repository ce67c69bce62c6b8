"""`lora-transfer --method distill`: carry an adapter to another base by distilling it into a new adapter there,
without the original data (after Trans-LoRA, Wang et al., NeurIPS 2024: data-free transfer of parameter-efficient
fine-tuning by knowledge distillation on data the source model generates).

1. The teacher — SOURCE with the adapter — draws `images_per_prompt` images of every prompt (seed 5000 + i),
   kept under WORK/teacher/<key> (keyed by the source's fingerprint, the adapter's bytes and the drawing), so a
   second run reuses them.
2. The adapter's training preset (lora-cli records it in the adapter's metadata; others give `--preset`) trains a
   new adapter on TARGET in WORK/student with `train.objective: transfer` (training/transfer_teacher.py): on the
   drawn images it learns the teacher's predictions; on the preset's prior images, drawn by TARGET, the target's
   own, so what the target already does well is kept. An interrupted transfer resumes from the student's last
   checkpoint.
3. The student adapter is written to OUT with `lora_cli.transferred_from` in its metadata.
"""

from __future__ import annotations

import gc
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from datasets_tools.check import MIN_IMAGES
from lora_cli.config.loader import load_preset, validate_preset
from lora_cli.config.schema import Preset
from lora_cli.errors import AdapterError, DatasetError, OutputExistsError, PresetError
from lora_cli.io.safetensors_file import load_tensors, read_metadata, save_tensors
from lora_cli.toolbox.transfer import check_one_architecture, transferred_from
from lora_cli.training.drawn import Drawing, draw_into_folder, is_complete

STEM = "teacher"
TEACHER_SEED = 5000


@dataclass(frozen=True)
class DistillSettings:
    prompts: list[str]
    images_per_prompt: int
    steps: int | None  # None: the preset's own
    work: Path


def training_preset(adapter: Path, preset_file: Path | None) -> Preset:
    """The preset to train the student with: `preset_file`, else the one lora-cli recorded in the adapter."""
    if preset_file is not None:
        return load_preset(preset_file)
    recorded = read_metadata(adapter, AdapterError).get("lora_cli.preset") if adapter.is_file() else None
    if recorded is None:
        raise PresetError(
            f"{adapter}: records no training preset (only lora-cli's adapters do); give --preset with the settings "
            "to train its replacement (e.g. one of presets/*.yaml for this architecture)"
        )
    try:
        raw = json.loads(recorded)
    except json.JSONDecodeError:
        raise AdapterError(f"{adapter}: metadata lora_cli.preset is not valid JSON; give --preset") from None
    return validate_preset(raw, f"{adapter} (lora_cli.preset)")


def default_prompts(preset: Preset, adapter: Path) -> list[str]:
    """The preset's preview prompts that are not prior prompts: what the adapter was trained to draw."""
    prompts = [prompt for prompt in preset.sample.prompts if prompt not in preset.prior.prompts]
    if not prompts:
        raise PresetError(
            f"{adapter}: its preset names no preview prompts beyond the prior's; give --prompts with what the "
            "adapter draws (one prompt per line)"
        )
    return list(dict.fromkeys(prompts))


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in [path] if path.is_file() else sorted(path.rglob("*.safetensors")):
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def draw_teacher_images(adapter: Path, source: str, preset: Preset, settings: DistillSettings) -> Path:
    """The folder of images SOURCE + adapter drew for the prompts (drawn now unless an earlier run did)."""
    from lora_cli.models import load_base
    from lora_cli.training.transfer_teacher import load_teacher_adapter

    drawing = Drawing(
        [prompt for prompt in settings.prompts for _ in range(settings.images_per_prompt)],
        TEACHER_SEED,
        preset.sample.steps or preset.prior.steps,
        preset.sample.guidance_scale,
        preset.data.resolution,
    )
    base = load_base(preset.model.model_copy(update={"path": source}))
    key = {"source": base.identity.fingerprint, "adapter": _file_digest(adapter), "drawing": drawing.__dict__}
    folder = settings.work / STEM / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    load_teacher_adapter(base, adapter, "lora-transfer")
    if not is_complete(folder, STEM):
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        for module in (base.denoiser, base.vae, *base.text_encoders.values()):
            module.to(device)
        draw_into_folder(base, drawing, folder, STEM)
    del base
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return folder


def student_preset(
    preset: Preset, adapter: Path, source: str, target: str, teacher: Path, settings: DistillSettings, name: str
) -> Preset:
    """The adapter's own preset aimed at TARGET, with the teacher's images as its only data and the source with
    the adapter as the teacher of `train.objective: transfer`."""
    raw = preset.model_dump(mode="json")
    raw["model"]["path"] = target
    raw["data"]["folder"] = str(teacher)
    raw["train"]["objective"] = "transfer"
    raw["adapter"]["text_encoder"] = False  # the teacher's conditioning is the student's (its adapter has none)
    if settings.steps is not None:
        raw["train"].update(steps=settings.steps, epochs=None)
    raw["transfer"] = {"source": source, "adapter": str(adapter.resolve())}
    raw["output"].update(dir=str(settings.work / "student"), name=name)
    return validate_preset(raw, f"{adapter} (its preset, aimed at {target})")


def distill_transfer(
    adapter: Path, source: str, target: str, out: Path, preset: Preset, settings: DistillSettings, console: Console
) -> dict:
    """Write OUT: an adapter trained on TARGET to draw what ADAPTER draws on SOURCE. Returns the metadata record."""
    from lora_cli.models.source import open_base_source
    from lora_cli.training.run import train
    from lora_cli.training.session import run_paths

    if out.exists():
        raise OutputExistsError(f"{out} already exists; choose a new file (nothing is overwritten)")
    drawn = len(settings.prompts) * settings.images_per_prompt
    if drawn < MIN_IMAGES:
        raise DatasetError(
            f"--images-per-prompt {settings.images_per_prompt} x {len(settings.prompts)} prompt(s) draws {drawn} "
            f"images; training needs at least {MIN_IMAGES}: ask for more images per prompt"
        )
    if preset.data.frames is not None:
        raise PresetError(
            "--method distill draws still images; for a video base use --method rotate (or retrain on clips)"
        )
    with open_base_source(source, "--from") as before, open_base_source(target, "--to") as after:
        check_one_architecture(before, after, source, target)
        fingerprints = {"source": before.fingerprint(), "target": after.fingerprint()}
    console.print(f"drawing {drawn} images with {source} + {adapter}", soft_wrap=True)
    teacher = draw_teacher_images(adapter, source, preset, settings)
    student = student_preset(preset, adapter, source, target, teacher, settings, out.stem)
    console.print(f"training the replacement on {target} from the images in {teacher}", soft_wrap=True)
    checkpoints = run_paths(student).checkpoints
    resume = checkpoints.is_dir() and any(checkpoints.iterdir())  # an interrupted transfer; else start afresh
    trained = train(student, console, resume=resume, overwrite=not resume, show_progress=False)
    if trained is None:
        raise AdapterError(f"{settings.work / 'student'}: training wrote no adapter")
    tensors, metadata = load_tensors(trained, AdapterError)
    record = {
        **transferred_from(adapter, source, target, fingerprints, "distill"),
        "prompts": settings.prompts,
        "images_per_prompt": settings.images_per_prompt,
        "steps": student.train.steps,
    }
    save_tensors(out, tensors, {**metadata, "lora_cli.transferred_from": json.dumps(record)})
    return record
