"""A frozen bitsandbytes 4-bit (nf4/fp4) Linear layer whose training matmul keeps its packed bytes for backward
through autograd's saved tensors (`FrozenMatmul`).

bitsandbytes' own `MatMul4Bit` keeps the packed weight as a plain attribute of its autograd context. Gradient
checkpointing sees only saved tensors, so with block offloading every offloaded block's device copy stayed
referenced from its forward pass until its backward: at the turn, all of them on the GPU at once. Without
gradients (previews, sampling) the layer runs bitsandbytes' own kernels.
"""

from __future__ import annotations

from functools import partial

import torch
from bitsandbytes import functional as bnb_functional
from bitsandbytes.nn import Linear4bit
from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

from lora_cli.models.frozen_matmul import FrozenMatmul


class TrainableLinear4bit(Linear4bit):
    """`bitsandbytes.nn.Linear4bit` (peft wraps it as one), with a training matmul that checkpointing can drop."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)
        fix_4bit_weight_quant_state_from_module(self)
        input_dtype = x.dtype
        x = x.to(self.compute_dtype or x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        dequantize = partial(bnb_functional.dequantize_4bit, quant_state=self.weight.quant_state)
        return FrozenMatmul.apply(x, bias, dequantize, self.weight).to(input_dtype)
