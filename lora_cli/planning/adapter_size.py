"""Which layers an adapter covers and how large its tensors are, from layer names and shapes alone."""

from __future__ import annotations

from functools import lru_cache

from lora_cli.adapters.targets import keep_late_blocks, pattern_matches
from lora_cli.config.schema import AdapterSection
from lora_cli.errors import AdapterError

Shapes = dict[str, tuple[int, ...]]
# nn.Embedding tables have 2-D weights like Linear layers but are never adapted.
EMBEDDING_SUFFIXES = ("embedding", "embed_tokens", "shared")


def adaptable_layers(shapes: Shapes) -> Shapes:
    """Linear (2-D) and Conv2d (4-D) layers, without embedding tables."""
    return {
        name: shape
        for name, shape in shapes.items()
        if len(shape) in (2, 4) and not name.rsplit(".", 1)[-1].endswith(EMBEDDING_SUFFIXES)
    }


def match_targets(layers: Shapes, patterns: list[str] | tuple[str, ...], where: str) -> list[str]:
    """Layer names matched by the patterns, in layer order; a pattern that matches nothing is an error."""
    matched: dict[str, None] = {}
    for pattern in patterns:
        hits = [name for name in layers if pattern_matches(pattern, name)]
        if not hits:
            raise AdapterError(f"{where}: pattern `{pattern}` matches no Linear/Conv2d layer of the base")
        matched.update(dict.fromkeys(hits))
    return [name for name in layers if name in matched]


def select_targets(
    layers: Shapes,
    section: AdapterSection,
    presets: dict[str, tuple[str, ...]],
    blocks: list[str],
    denoiser: str,
) -> list[str]:
    """The denoiser layers `adapter.targets` (and `adapter.late`) select, as training would."""
    spec = section.target_spec
    patterns = presets[spec] if isinstance(spec, str) else spec
    names = match_targets(layers, patterns, f"adapter.targets ({denoiser})")
    return keep_late_blocks(names, blocks, section.late) if section.late else names


def adapter_tensor_sizes(section: AdapterSection, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Element counts of the trainable tensors the adapter adds to one layer of weight `shape`."""
    from lora_cli.adapters.injection import usable_rank

    conv = len(shape) == 4
    rank = section.effective_conv_rank if conv else section.rank
    return _peft_sizes(section.type, usable_rank(rank, shape), section.dora, shape)


@lru_cache(maxsize=512)
def _peft_sizes(algorithm: str, rank: int, dora: bool, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Ask peft itself: wrap a layer of this shape on the meta device (no memory) and count its new tensors."""
    import torch
    from peft import inject_adapter_in_model
    from torch import nn

    from lora_cli.adapters.registry import AdapterSpec, get_algorithm

    with torch.device("meta"):
        layer = nn.Conv2d(shape[1], shape[0], tuple(shape[2:])) if len(shape) == 4 else nn.Linear(shape[1], shape[0])
        holder = nn.Sequential(layer)
    spec = AdapterSpec(algorithm, rank, float(rank), dora=dora)
    inject_adapter_in_model(get_algorithm(algorithm).peft_config(spec, ["0"]), holder)
    return tuple(p.numel() for p in holder.parameters() if p.requires_grad)
