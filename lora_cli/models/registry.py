"""The supported base architectures, and which one a pipeline class belongs to."""

from __future__ import annotations

from lora_cli.errors import ModelLoadError
from lora_cli.models.base import Architecture
from lora_cli.models.flux import Flux
from lora_cli.models.flux2 import Flux2
from lora_cli.models.hunyuan_video import HunyuanVideo
from lora_cli.models.longcat_image import LongCatImage
from lora_cli.models.pixart import PixArt
from lora_cli.models.qwen_image import QwenImage
from lora_cli.models.sd3 import StableDiffusion3
from lora_cli.models.stable_diffusion import StableDiffusion
from lora_cli.models.stable_diffusion_xl import StableDiffusionXL
from lora_cli.models.wan import Wan
from lora_cli.models.z_image import ZImage

ARCHITECTURES: tuple[Architecture, ...] = (
    StableDiffusion(),
    StableDiffusionXL(),
    Flux(),
    StableDiffusion3(),
    PixArt(),
    Wan(),
    ZImage(),
    QwenImage(),
    Flux2(),
    HunyuanVideo(),
    LongCatImage(),
)


def architecture_for(pipeline_class: str, where: str) -> Architecture:
    """The architecture of a `pipeline_class` (from model_index.json or a single file's keys); `where` names the
    base in the error when none matches."""
    architecture = next((arch for arch in ARCHITECTURES if arch.matches(pipeline_class)), None)
    if architecture is None:
        supported = ", ".join(arch.name for arch in ARCHITECTURES)
        raise ModelLoadError(f"{where} is a {pipeline_class}, which lora-cli does not support yet ({supported})")
    return architecture


def architecture_named(name: str) -> Architecture:
    """The architecture with this `name` (as adapter metadata records it)."""
    for architecture in ARCHITECTURES:
        if architecture.name == name:
            return architecture
    raise KeyError(name)
