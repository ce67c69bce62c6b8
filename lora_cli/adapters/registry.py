"""Adapter algorithms by name: how peft is configured for each, how its tensors are named in files,
and how files are recognised."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lora_cli.errors import AdapterError


@dataclass(frozen=True)
class AdapterSpec:
    """Hyper-parameters of one adapter, with per-module rank/alpha where they differ (conv layers, files)."""

    algorithm: str
    rank: int
    alpha: float
    dropout: float = 0.0
    dora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def rank_of(self, module: str) -> int:
        return self.rank_pattern.get(module, self.rank)

    def alpha_of(self, module: str) -> float:
        return self.alpha_pattern.get(module, self.alpha)


Named = dict[str, torch.Tensor]


def common_peft_kwargs(spec: AdapterSpec, target_modules: list[str]) -> dict[str, Any]:
    """The config fields every peft adapter type shares: rank, exact targets, per-module rank patterns."""
    return {"r": spec.rank, "target_modules": target_modules, "rank_pattern": exact_pattern(spec.rank_pattern)}


def exact_pattern(pattern: dict[str, Any]) -> dict[str, Any]:
    """peft reads pattern keys as regexes matched at a name's end; escape full names so dots are literal."""
    return {re.escape(name): value for name, value in pattern.items()}


@dataclass(frozen=True)
class AdapterAlgorithm:
    """One algorithm: peft config factory, peft-to-file tensor names, file detection and rank reading."""

    name: str
    peft_config: Callable[[AdapterSpec, list[str]], Any]
    # peft parameter suffix (after the module path) -> kohya/LyCORIS tensor name.
    tensor_names: dict[str, str]
    # A tensor name whose presence in a file means this algorithm (None: never detected, e.g. locon = lora).
    marker: str | None
    # Rank of one module from its file tensors.
    rank_from_file: Callable[[Named], int]
    # Whether a module's file tensors are complete (e.g. a LoRA layer needs both down and up).
    complete: Callable[[set[str]], bool]
    # Exact transform of one module's peft tensors (+ alpha) into the file's convention; identity by default.
    # Reading needs no inverse: tensors are reshaped to the layer's parameters and rank/alpha come from the file.
    to_file: Callable[[Named, float, int], Named] = lambda named, alpha, rank: named


_REGISTRY: dict[str, AdapterAlgorithm] = {}


def register(algorithm: AdapterAlgorithm) -> AdapterAlgorithm:
    _REGISTRY[algorithm.name] = algorithm
    return algorithm


def get_algorithm(name: str) -> AdapterAlgorithm:
    _load_builtin_algorithms()
    if name not in _REGISTRY:
        raise AdapterError(f"adapter.type: unknown algorithm `{name}`; choose from {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def detect_algorithm(tensor_names: set[str], source: str) -> AdapterAlgorithm:
    """The algorithm of a file from the tensor names it holds (`lora_down`, `hada_w1_a`, `lokr_w1` ...)."""
    _load_builtin_algorithms()
    found = {a.name for a in _REGISTRY.values() if a.marker and any(n.startswith(a.marker) for n in tensor_names)}
    if len(found) != 1:
        what = "no known adapter tensors" if not found else f"tensors of several algorithms ({', '.join(found)})"
        raise AdapterError(f"{source}: {what}; expected LoRA, LoHa or LoKr tensors")
    return _REGISTRY[found.pop()]


def _load_builtin_algorithms() -> None:
    import lora_cli.adapters.loha
    import lora_cli.adapters.lokr
    import lora_cli.adapters.lora  # noqa: F401  (each registers itself)
