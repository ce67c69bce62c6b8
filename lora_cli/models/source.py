"""Where a base model lives (folder, single file or hub id) and which pipeline class it declares."""

from __future__ import annotations

import json
from pathlib import Path

from lora_cli.builtin import BUILTIN_PREFIX, builtin_models, builtin_path
from lora_cli.config.schema import ModelSection
from lora_cli.errors import ModelLoadError
from lora_cli.io.safetensors_file import PICKLE_SUFFIXES, header_fingerprint, read_header


def local_location(spec: ModelSection) -> Path | None:
    """The local file or folder named by `model.path` (or `builtin:NAME`), or None for a hub id."""
    if spec.path.startswith(BUILTIN_PREFIX):
        name = spec.path.removeprefix(BUILTIN_PREFIX)
        if name not in builtin_models():
            raise ModelLoadError(
                f"model.path: no built-in model `{name}`; available: {', '.join(builtin_models()) or 'none'}"
            )
        return builtin_path(name)
    path = Path(spec.path).expanduser()
    if path.exists():
        return path
    looks_local = spec.path.startswith((".", "/", "~")) or path.suffix.lower() in (
        ".safetensors",
        *PICKLE_SUFFIXES,
    )
    if looks_local or spec.path.count("/") != 1:
        raise ModelLoadError(
            f"model.path: {spec.path} does not exist; give a diffusers folder, a .safetensors file or a hub id"
        )
    return None


def pipeline_class_name(spec: ModelSection, location: Path | None) -> str:
    """The `_class_name` from model_index.json, or the family a single-file checkpoint's keys belong to."""
    if location is not None and location.is_file():
        if location.suffix.lower() != ".safetensors":
            raise ModelLoadError(
                f"model.path: {location} is not a .safetensors checkpoint; "
                "pickle formats are refused (they can run code)"
            )
        from lora_cli.models.single_file import detect_layout

        return detect_layout(read_header(location, ModelLoadError), f"model.path: {location}").pipeline_class
    if location is not None:
        index = location / "model_index.json"
        if not index.is_file():
            raise ModelLoadError(f"model.path: {location} has no model_index.json; is it a diffusers pipeline folder?")
        try:
            return json.loads(index.read_text())["_class_name"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ModelLoadError(f"model.path: {index} is damaged (not JSON with a _class_name)") from None
    from diffusers import DiffusionPipeline

    try:
        config = DiffusionPipeline.load_config(spec.path, revision=spec.revision)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model.path: cannot find hub model {spec.path} ({_first_line(exc)})") from None
    return config["_class_name"]


def weight_fingerprint(spec: ModelSection, location: Path | None) -> str:
    """A fingerprint of the weight files' safetensors headers (fast: no tensor data is read)."""
    if location is None:
        from huggingface_hub import snapshot_download

        location = Path(snapshot_download(spec.path, revision=spec.revision, local_files_only=True))
    files = [location] if location.is_file() else sorted(location.rglob("*.safetensors"))
    return header_fingerprint(files)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
