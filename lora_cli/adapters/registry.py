"""Adapter algorithms by name: how to configure peft for each, and how its tensors are named in files."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lora_cli.config.schema import AdapterSection
from lora_cli.errors import AdapterError


@dataclass(frozen=True)
class AdapterAlgorithm:
    """One algorithm: a peft config factory and the peft-to-file parameter name table."""

    name: str
    peft_config: Callable[[AdapterSection, list[str]], Any]
    # peft parameter suffix (after the module path) -> kohya/LyCORIS parameter name.
    tensor_names: dict[str, str]


_REGISTRY: dict[str, AdapterAlgorithm] = {}


def register(algorithm: AdapterAlgorithm) -> AdapterAlgorithm:
    _REGISTRY[algorithm.name] = algorithm
    return algorithm


def get_algorithm(name: str) -> AdapterAlgorithm:
    import lora_cli.adapters.lora  # noqa: F401  (registers itself)

    if name not in _REGISTRY:
        raise AdapterError(f"adapter.type: unknown algorithm `{name}`; choose from {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]
