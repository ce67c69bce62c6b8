"""Which modules of a component an adapter is injected into."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable

from torch import nn

from lora_cli.errors import AdapterError

ADAPTABLE_LAYERS = (nn.Linear, nn.Conv2d)


def adaptable_module_names(model: nn.Module) -> list[str]:
    """Names of the layers an adapter can wrap (Linear and Conv2d), also when an adapter already wraps them
    (a peft layer counts under its own name; its base layer and adapter weights do not count)."""
    names: list[str] = []
    wrapped: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if wrapped and name.startswith(wrapped):
            continue
        if hasattr(module, "get_base_layer") and isinstance(module.get_base_layer(), ADAPTABLE_LAYERS):
            names.append(name)
            wrapped = (*wrapped, name + ".")
        elif isinstance(module, ADAPTABLE_LAYERS):
            names.append(name)
    return names


def pattern_matches(pattern: str, name: str) -> bool:
    """A glob matches the full dotted name; a plain pattern matches the name or a dotted suffix of it."""
    if any(char in pattern for char in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def resolve_targets(model: nn.Module, patterns: Iterable[str], where: str) -> list[str]:
    """Full module names matched by `patterns`; a pattern that matches nothing is an error naming close names."""
    candidates = adaptable_module_names(model)
    matched: dict[str, None] = {}
    for pattern in patterns:
        hits = [name for name in candidates if pattern_matches(pattern, name)]
        if not hits:
            raise AdapterError(
                f"{where}: pattern `{pattern}` matches no Linear/Conv2d layer{_close(pattern, candidates)}"
            )
        matched.update(dict.fromkeys(hits))
    return list(matched)


def _close(pattern: str, candidates: list[str]) -> str:
    leaves = sorted({name.split(".")[-1] for name in candidates} | {".".join(n.split(".")[-2:]) for n in candidates})
    close = difflib.get_close_matches(pattern, leaves, n=3, cutoff=0.5)
    return f"; close names: {', '.join(close)}" if close else f"; layer names end in e.g. {', '.join(leaves[:6])}"


def keep_late_blocks(names: list[str], blocks: list[str], late: int) -> list[str]:
    """Only the modules inside the last `late` blocks (Late-Stage LoRA); none left is an error."""
    if late > len(blocks):
        raise AdapterError(f"adapter.late: {late} is more than the denoiser's {len(blocks)} blocks")
    kept_blocks = tuple(f"{block}." for block in blocks[-late:])
    kept = [name for name in names if name.startswith(kept_blocks)]
    if not kept:
        raise AdapterError(
            f"adapter.late: no targeted module lies in the last {late} blocks ({', '.join(blocks[-late:])})"
        )
    return kept
