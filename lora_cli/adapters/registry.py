"""Adapter algorithms by name: how peft is configured for each, how its tensors are named in files, how files
are recognised, and what each can do (the capabilities every other module asks instead of naming algorithms)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lora_cli.errors import AdapterError

if TYPE_CHECKING:
    import torch


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


Named = dict[str, "torch.Tensor"]


def common_peft_kwargs(spec: AdapterSpec, target_modules: list[str]) -> dict[str, Any]:
    """The config fields every peft adapter type shares: rank, exact targets, per-module rank patterns."""
    return {"r": spec.rank, "target_modules": target_modules, "rank_pattern": exact_pattern(spec.rank_pattern)}


def exact_pattern(pattern: dict[str, Any]) -> dict[str, Any]:
    """peft (and diffusers' loader through it) reads pattern keys as regexes matched at a name's end, so a bare
    `time_text_embed.linear` would also set HunyuanVideo's `context_embedder.time_text_embed.linear`: keys are
    the full names escaped (dots literal) and anchored at the start."""
    return {"^" + re.escape(name): value for name, value in pattern.items()}


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
    # Capabilities.
    formats: tuple[str, ...] = ("kohya",)  # key layouts that can hold it (diffusers' layout holds LoRA only)
    dora: bool = False  # weight decomposition (DoRA) on top
    dropout: bool = False  # dropout on the adapter's input while training
    quantized_base: bool = False  # trains beside bitsandbytes-quantized layers (peft has such layers for it)
    default_targets: str = "full"  # the target preset when `adapter.targets` is unset
    full_delta: bool = True  # its layers build the whole delta weight each forward (memory: a weight per layer)
    kohya_network_module: str = "lycoris.kohya"  # what kohya's `ss_network_module` metadata calls it

    def layout_refusal(self, file_format: str) -> str | None:
        """Why a key layout cannot hold this algorithm (None when it can)."""
        if file_format in self.formats:
            return None
        return f"the {file_format} layout cannot hold {self.name} adapters; use {' or '.join(self.formats)}"


_REGISTRY: dict[str, AdapterAlgorithm] = {}


def register(algorithm: AdapterAlgorithm) -> AdapterAlgorithm:
    _REGISTRY[algorithm.name] = algorithm
    return algorithm


def algorithms() -> dict[str, AdapterAlgorithm]:
    """Every registered algorithm by name."""
    _load_builtin_algorithms()
    return dict(_REGISTRY)


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
    """Each algorithm module registers itself when imported; this order is the order users see."""
    from importlib import import_module

    for name in ("lora", "loha", "lokr"):
        import_module(f"lora_cli.adapters.{name}")
