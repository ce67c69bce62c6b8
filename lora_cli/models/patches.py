"""2x2 latent patches packed into tokens, as the Flux-family pipelines (Flux, Qwen-Image, ...) feed their
transformers: [B, C, h, w] <-> [B, (h/2)(w/2), 4C], features ordered channel, patch row, patch column."""

from __future__ import annotations

import math

import torch


def pack_patches(latents: torch.Tensor) -> torch.Tensor:
    batch, channels, height, width = latents.shape
    packed = latents.reshape(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return packed.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_patches(tokens: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """Tokens of a `rows` x `columns` patch grid back to [B, C, 2 rows, 2 columns]."""
    batch, _, features = tokens.shape
    unpacked = tokens.reshape(batch, rows, columns, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return unpacked.reshape(batch, features // 4, rows * 2, columns * 2)


def unpack_pipeline_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A pipeline's packed latents for an image of `height` x `width` back to [B, C, h, w]."""
    rows = round(math.sqrt(tokens.shape[1] * height / width))
    return unpack_patches(tokens, rows, tokens.shape[1] // rows)
