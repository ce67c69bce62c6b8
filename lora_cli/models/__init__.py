"""Base-model architectures, one module each, and the loader that picks the right one."""

from __future__ import annotations

import tempfile
from pathlib import Path

from lora_cli.config.schema import ModelSection
from lora_cli.errors import ModelLoadError
from lora_cli.io.pickle_file import as_safetensors, is_pickle
from lora_cli.models.base import Architecture, BaseIdentity, LoadedBase
from lora_cli.models.flux import Flux
from lora_cli.models.pixart import PixArt
from lora_cli.models.sd3 import StableDiffusion3
from lora_cli.models.source import local_location, pipeline_class_name
from lora_cli.models.stable_diffusion import StableDiffusion
from lora_cli.models.stable_diffusion_xl import StableDiffusionXL
from lora_cli.models.wan import Wan

ARCHITECTURES: tuple[Architecture, ...] = (
    StableDiffusion(),
    StableDiffusionXL(),
    Flux(),
    StableDiffusion3(),
    PixArt(),
    Wan(),
)


def load_base(spec: ModelSection) -> LoadedBase:
    """Load the base named by the preset's `model` section, frozen, in its storage dtype."""
    location = local_location(spec)
    if location is not None and location.is_file() and is_pickle(location):
        if not spec.allow_pickle:
            raise ModelLoadError(
                f"model.path: {location} is a pickle-based checkpoint, which can run code when loaded; "
                "convert it to .safetensors or pass --allow-pickle"
            )
        with as_safetensors([location], True, Path(tempfile.gettempdir())) as (converted,):
            return _load(spec, converted)
    return _load(spec, location)


def _load(spec: ModelSection, location: Path | None) -> LoadedBase:
    import torch

    class_name = pipeline_class_name(spec, location)
    architecture = next((arch for arch in ARCHITECTURES if arch.matches(class_name)), None)
    if architecture is None:
        supported = ", ".join(arch.name for arch in ARCHITECTURES)
        raise ModelLoadError(
            f"model.path: {spec.path} is a {class_name}, which lora-cli cannot train yet ({supported})"
        )
    try:
        base = architecture.load(spec, location, getattr(torch, spec.dtype))
    except (OSError, ValueError, KeyError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"model.path: cannot load {spec.path}: {message}") from None
    if spec.quantize != "none":
        from lora_cli.models.quantize import quantize_linear_layers

        compute_dtype = getattr(torch, spec.dtype)
        base.pipeline_extras["quantization"] = quantize_linear_layers(base.denoiser, spec.quantize, compute_dtype)
    for module in (base.denoiser, base.vae, *base.text_encoders.values()):
        module.requires_grad_(False)
        module.eval()
    return base


__all__ = ["ARCHITECTURES", "Architecture", "BaseIdentity", "LoadedBase", "load_base"]
