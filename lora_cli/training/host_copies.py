"""Host copies of many tensors, packed into a few buffers whose sizes are powers of two.

torch's pinned-memory allocator (its CachingHostAllocator, as of torch 2.13) rounds every allocation up to a
power of two, so pinning each weight of an offloaded block on its own costs up to twice its bytes: a 3072 x 3072
bf16 matrix (18 MiB) takes 32 MiB. Buffers of power-of-two sizes are not rounded; filled largest tensor first,
they hold the copies with little to spare.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

ALIGN = 512  # bytes: every copy starts where a view of any dtype may start
SMALLEST = 2 * 2**20  # bytes: the smallest buffer; the total is rounded up to a multiple of it


def host_copies(tensors: Sequence[torch.Tensor], pinned: bool) -> list[torch.Tensor]:
    """Copies of `tensors` on the host, each a view into a shared buffer, in pinned memory when `pinned`."""
    sizes, places = placement([tensor.numel() * tensor.element_size() for tensor in tensors])
    buffers = [torch.empty(size, dtype=torch.uint8, device="cpu", pin_memory=pinned) for size in sizes]
    return [_carve(buffers[slot], offset, tensor) for (slot, offset), tensor in zip(places, tensors, strict=True)]


def placement(sizes: Sequence[int]) -> tuple[list[int], list[tuple[int, int]]]:
    """(buffer sizes, each a power of two; (buffer, byte offset) of each of `sizes`): buffers for the total,
    filled largest first, plus one of its own for a size no gap had room for."""
    spans = [-(-size // ALIGN) * ALIGN for size in sizes]
    buffers = buffer_sizes(sum(spans))
    used = [0] * len(buffers)
    places = [(0, 0)] * len(spans)
    for index in sorted(range(len(spans)), key=lambda i: -spans[i]):
        slot = next((b for b, size in enumerate(buffers) if size - used[b] >= spans[index]), None)
        if slot is None:
            buffers.append(1 << max(spans[index] - 1, 0).bit_length())
            used.append(0)
            slot = len(buffers) - 1
        places[index] = (slot, used[slot])
        used[slot] += spans[index]
    return buffers, places


def buffer_sizes(total: int) -> list[int]:
    """`total` bytes rounded up to a multiple of SMALLEST, as distinct powers of two, largest first."""
    total = -(-total // SMALLEST) * SMALLEST
    return [1 << bit for bit in range(total.bit_length() - 1, -1, -1) if total >> bit & 1]


def _carve(buffer: torch.Tensor, offset: int, tensor: torch.Tensor) -> torch.Tensor:
    size = tensor.numel() * tensor.element_size()
    return buffer[offset : offset + size].view(tensor.dtype).view(tensor.shape).copy_(tensor.detach())
