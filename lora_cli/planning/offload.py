"""What block offloading (`train.offload_blocks`) changes in a memory plan: the blocks' bytes that leave the GPU,
the two of them it holds at once, the text encoders' streamed blocks, and the copies' time per micro-batch."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from lora_cli.planning.inventory import Weight

# Host-to-GPU copies from pinned memory: about 25 GB/s on PCIe 4.0 x16 and 12 GB/s on PCIe 3.0 x16 (or 4.0 x8,
# as on several consumer cards); the default is between them. `--plan --host-link GBPS` states the machine's.
HOST_LINK_GBPS = 20.0
# T5's encoder.block.N, CLIP's text_model.encoder.layers.N, Qwen3's layers.N
_ENCODER_BLOCK = re.compile(r"^((?:.*?\.)?(?:block|blocks|layers)\.\d+)\.")

Stored = Callable[[Weight], float]  # bytes one weight takes once loaded


def offloaded_block_bytes(weights: Iterable[Weight], blocks: list[str], count: int, stored: Stored) -> tuple[int, ...]:
    """Stored bytes of each of the last `count` blocks (the ones `train.offload_blocks` moves)."""
    away = blocks[len(blocks) - count :] if count else []
    weights = list(weights)
    return tuple(round(sum(stored(w) for w in weights if w.name.startswith(f"{block}."))) for block in away)


def at_once(blocks: tuple[int, ...]) -> int:
    """What the GPU holds of the offloaded blocks at a time: the two largest (one running, one prefetched)."""
    return sum(sorted(blocks)[-2:])


def streamed_bytes(weights: Iterable[Weight], full: int, stored: Stored) -> tuple[int, int, int] | None:
    """(bytes on the GPU, block count, bytes of the blocks' pinned host copies) of a text encoder whose blocks
    stream while it encodes; None when it has fewer than three blocks (nothing to gain)."""
    blocks: dict[str, float] = {}
    for weight in weights:
        match = _ENCODER_BLOCK.match(weight.name)
        if match:
            blocks[match.group(1)] = blocks.get(match.group(1), 0.0) + stored(weight)
    if len(blocks) < 3:
        return None
    host = sum(blocks.values())
    return round(full - host + at_once(tuple(blocks.values()))), len(blocks), round(host)


def copy_note(blocks: tuple[int, ...], gbps: float) -> str:
    """The copies' volume and time per micro-batch: each block goes over twice (forward, then recomputation)."""
    moved = 2 * sum(blocks)
    return (
        f"offloading {len(blocks)} blocks copies {moved / 2**30:.1f} GiB to the GPU per micro-batch: "
        f"{moved / (gbps * 1e9):.2f} s at {gbps:g} GB/s (--host-link), overlapped with computation except for the "
        "first block of each pass"
    )
