"""Base-model architectures, one module each (`registry` lists them), where a base lives (`source`), its
tensors on disk (`weights`) and the loader that builds the frozen pipeline components (`loading`).

Names are imported on first use, so importing a light submodule (`lora_cli.models.quantize`'s modes for the
preset schema) does not import torch and every architecture.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "ARCHITECTURES": "registry",
    "architecture_for": "registry",
    "Architecture": "base",
    "BaseIdentity": "base",
    "LoadedBase": "base",
    "BaseSource": "source",
    "open_base_source": "source",
    "load_base": "loading",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)


__all__ = list(_EXPORTS)
