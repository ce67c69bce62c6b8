"""A frozen bitsandbytes 4-bit (nf4/fp4) Linear layer whose training matmul keeps its packed bytes for backward
through autograd's saved tensors.

bitsandbytes' own `MatMul4Bit` keeps the packed weight as a plain attribute of its autograd context. Gradient
checkpointing sees only saved tensors, so with block offloading every offloaded block's device copy stayed
referenced from its forward pass until its backward: at the turn, all of them on the GPU at once. Here the bytes
go through `save_for_backward`, which checkpointing replaces by a recomputation, and backward dequantizes again.
Without gradients (previews, sampling) the layer runs bitsandbytes' own kernels.
"""

from __future__ import annotations

from typing import Any

import torch
from bitsandbytes import functional as bnb_functional
from bitsandbytes.nn import Linear4bit
from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module
from torch.nn import functional


class TrainableLinear4bit(Linear4bit):
    """`bitsandbytes.nn.Linear4bit` (peft wraps it as one), with a training matmul that checkpointing can drop."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)
        fix_4bit_weight_quant_state_from_module(self)
        input_dtype = x.dtype
        x = x.to(self.compute_dtype or x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return FourBitMatmul.apply(x, self.weight, self.weight.quant_state, bias).to(input_dtype)


class FourBitMatmul(torch.autograd.Function):
    """`x @ dequantize(packed).T + bias` for a frozen 4-bit weight; backward needs the weight only for the
    input's gradient, and dequantizes it again from the saved bytes."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, packed: torch.Tensor, quant_state: Any, bias: torch.Tensor | None
    ) -> torch.Tensor:
        ctx.save_for_backward(packed)
        ctx.quant_state = quant_state  # absmax and codes: small, and never offloaded
        weight = bnb_functional.dequantize_4bit(packed, quant_state).to(x.dtype)
        return functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        (packed,) = ctx.saved_tensors
        weight = bnb_functional.dequantize_4bit(packed, ctx.quant_state).to(grad_output.dtype)
        return grad_output @ weight, None, None, None
