"""How many text tokens a base's encoders produce and its denoiser attends to, read from the weights' headers."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lora_cli.models.base import Architecture
    from lora_cli.planning.inventory import BaseInventory

CLIP_TOKENS = 77


def denoiser_text_tokens(
    inventory: BaseInventory, architecture: Architecture, clip_tokens: int, limit: int | None
) -> int:
    """Text tokens the denoiser attends to: a DiT's T5 limit (`limit`, i.e. `model.max_text_tokens`, else the
    architecture's default; after SD3's `clip_tokens`), else the first CLIP encoder's position rows."""
    default = getattr(architecture, "default_text_tokens", None)
    if default is not None:
        return clip_tokens + (limit or default)
    for component in text_encoders(inventory, architecture):
        if (rows := _position_rows(inventory, component)) is not None:
            return rows
    return CLIP_TOKENS


def encoder_tokens(inventory: BaseInventory, component: str, architecture: Architecture, limit: int | None) -> int:
    """Tokens one text encoder sees: a CLIP encoder its position rows, a T5 encoder the DiT's token limit."""
    rows = _position_rows(inventory, component)
    if rows is not None:
        return rows
    return limit or getattr(architecture, "default_text_tokens", CLIP_TOKENS)


def text_encoders(inventory: BaseInventory, architecture: Architecture) -> list[str]:
    """The base's text encoder components."""
    return [
        name for name in architecture.kohya_table if name != architecture.denoiser_name and name in inventory.components
    ]


def _position_rows(inventory: BaseInventory, component: str) -> int | None:
    for weight in inventory.components[component]:
        if weight.name.endswith("position_embedding.weight"):
            return weight.shape[0]
    return None
