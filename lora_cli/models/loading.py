"""Load a base for training or sampling: resolve it, build its frozen components, optionally quantize."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lora_cli.errors import ModelLoadError
from lora_cli.models.base import LoadedBase
from lora_cli.models.source import open_base_source

if TYPE_CHECKING:
    import torch

    from lora_cli.config.schema import ModelSection


def load_base(spec: ModelSection, compute_device: torch.device | None = None) -> LoadedBase:
    """Load the base named by the preset's `model` section, frozen, in its storage dtype, on the host. A
    quantized base is quantized on `compute_device` when that is a GPU (default: this process's GPU, if any)."""
    import torch

    where = "model.path"
    with open_base_source(spec.path, where, spec.revision, spec.variant, spec.allow_pickle) as source:
        try:
            base = source.architecture.load(spec, source, getattr(torch, spec.dtype))
        except (OSError, ValueError, KeyError) as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"{where}: cannot load {spec.path}: {message[:300]}") from None
    if spec.quantize != "none":
        from lora_cli.models.devices import process_gpu
        from lora_cli.models.quantize import quantize_linear_layers

        device = compute_device or process_gpu()
        work_device = device if device is not None and device.type == "cuda" else None
        compute_dtype = getattr(torch, spec.dtype)
        report = quantize_linear_layers(base.denoiser, spec.quantize, compute_dtype, work_device)
        base.pipeline_extras["quantization"] = report
    for module in (base.denoiser, base.vae, *base.text_encoders.values()):
        module.requires_grad_(False)
        module.eval()
    return base
