"""float8 (e4m3) storage for a frozen Linear layer: one byte per weight plus a float32 scale per output row,
upcast to the compute dtype when the layer runs (`model.quantize: fp8`).

The upcast weight lives only while a matmul uses it (`FrozenMatmul` keeps the float8 bytes for backward and
upcasts them again there): `functional.linear` on the upcast weight would keep that copy from forward to
backward, and without gradient checkpointing every layer's copy at once, more memory than the unquantized base."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from lora_cli.models.frozen_matmul import FrozenMatmul

FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def to_float8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 scale per output row), weight ≈ stored * scale: each row is scaled so that
    its largest magnitude lands on the format's largest finite number."""
    matrix = weight.float()
    scale = matrix.abs().amax(dim=1).clamp_min(1e-12) / FP8_MAX
    return (matrix / scale[:, None]).to(torch.float8_e4m3fn), scale


class Float8Linear(nn.Linear):
    """A frozen Linear layer stored in float8 and run in `compute_dtype`. `weight` is the upcast weight, made when
    read: peft wraps the layer like any nn.Linear and reads it for devices, dtypes and DoRA's norms."""

    weight_is_quantized = True

    def __init__(
        self,
        linear: nn.Linear,
        compute_dtype: torch.dtype,
        input_hook: Callable | None = None,
        work_device: torch.device | None = None,
    ) -> None:
        """Convert `linear`'s weight (on `work_device` when given: a GPU does it far faster than the CPU); the
        bytes stay where the weight was."""
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = compute_dtype
        weight = linear.weight.data
        stored, scale = (t.to(weight.device) for t in to_float8(weight.to(work_device or weight.device)))
        self.register_buffer("weight_fp8", stored.view(torch.uint8))  # bytes: `.to(dtype)` must not convert them
        self.register_buffer("weight_scale", scale)
        bias = None if linear.bias is None else nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
        self.register_parameter("bias", bias)
        if input_hook is not None:
            self.register_forward_pre_hook(input_hook)

    @property
    def weight(self) -> torch.Tensor:
        return upcast(self.weight_fp8, self.weight_scale, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dequantize = partial(upcast, dtype=self.compute_dtype)
        return FrozenMatmul.apply(x, self.bias, dequantize, self.weight_fp8, self.weight_scale)


def upcast(stored: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight in `dtype` from its float8 bytes and row scales."""
    return stored.view(torch.float8_e4m3fn).to(dtype).mul_(scale[:, None].to(dtype))  # one temporary, not two
