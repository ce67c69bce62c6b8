"""The training matmul of a frozen Linear layer whose weight is stored compressed (fp8, nf4/fp4)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.nn import functional


class FrozenMatmul(torch.autograd.Function):
    """`x @ weight.T + bias`, the weight made by `dequantize(*stored)` only while a matmul needs it.

    Backward needs the weight only for the input's gradient: it keeps the stored tensors, through saved tensors
    (which gradient checkpointing drops and recomputes), and dequantizes again. Keeping the dequantized weight
    would hold a full-precision copy of every layer from forward to backward without checkpointing; keeping the
    stored bytes outside saved tensors (as bitsandbytes' 4-bit matmul does) would keep offloaded blocks' device
    copies alive until backward."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        dequantize: Callable[..., torch.Tensor],
        *stored: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(*stored)
        ctx.dequantize, ctx.input_dtype = dequantize, x.dtype
        return functional.linear(x, dequantize(*stored).to(x.dtype), bias)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        stored = ctx.saved_tensors  # once: gradient checkpointing's recomputed tensors unpack only once
        unused = (None,) * (2 + len(stored))
        if not ctx.needs_input_grad[0]:
            return (None, *unused)
        weight = ctx.dequantize(*stored).to(grad_output.dtype)
        return ((grad_output @ weight).to(ctx.input_dtype), *unused)
