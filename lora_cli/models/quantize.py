"""A quantized frozen base (QLoRA): the denoiser's Linear layers stored as bitsandbytes 4-bit or 8-bit weights,
or as float8 (e4m3) with a scale per output row.

The layers are swapped in by hand after loading (bitsandbytes quantizes a weight when it is moved to a
device), so the same path runs on CPU — where diffusers' BitsAndBytesConfig refuses to load — and on CUDA.
Adapters train beside the quantized layers (peft's bitsandbytes LoRA layers; for fp8, every algorithm, as the
layer is an nn.Linear whose `weight` is upcast when read); nothing is ever merged into quantized weights.
Convolutions stay in the storage dtype: in UNets they hold most of the weights, in DiTs almost none.

fp8 uses torch's own `float8_e4m3fn` dtype as storage only and computes in the base's dtype (bf16 on a GPU),
upcasting one layer's weight at a time: no extra dependency, and it runs on the CPU and on every CUDA GPU,
where torchao's float8 training (scaled fp8 matmuls) needs Ada/Hopper and trains the weights it converts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lora_cli.errors import ModelLoadError

if TYPE_CHECKING:
    import torch
    from torch import nn

MODES = ("fp8", "nf4", "fp4", "int8")
BITSANDBYTES_MODES = ("nf4", "fp4", "int8")
CHOICES = ("none", *MODES)  # `model.quantize`, `lora-sample --quantize` and the planner take these
BLOCK = 64  # 4-bit layers must have both widths multiples of this (bitsandbytes' blocks and its CPU kernel)


def stored_bytes(mode: str, shape: tuple[int, ...]) -> float:
    """Bytes one Linear weight takes in `mode`: int8 and fp8, one byte per weight and a float32 scale per output
    row; nf4/fp4, half a byte per weight and an absmax per block of 64, itself quantized to one byte with a float32
    absmax per 256 of those (bitsandbytes' double quantization, which its 4-bit weights get by default)."""
    numel = math.prod(shape)
    if mode in ("int8", "fp8"):
        return numel + 4 * shape[0]
    if mode in ("nf4", "fp4"):
        blocks = math.ceil(numel / BLOCK)
        return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / 256)
    raise ValueError(f"quantize must be one of {MODES}, got {mode!r}")


def quantizes(mode: str, shape: tuple[int, ...]) -> bool:
    """Whether `mode` stores a weight of this shape quantized: Linear (2-D) weights only, and for 4-bit only
    those whose widths are multiples of 64 (bitsandbytes' blocks and its CPU kernel); the rest stay as stored."""
    return len(shape) == 2 and (mode not in ("nf4", "fp4") or not any(width % BLOCK for width in shape))


def moved_bytes(mode: str, shape: tuple[int, ...]) -> float:
    """Bytes of a quantized weight that block offloading moves: a 4-bit weight's packed bytes (its statistics stay
    on the device with the layer's quantization state); an fp8 weight and its scales."""
    return math.ceil(math.prod(shape) / 2) if mode in ("nf4", "fp4") else stored_bytes(mode, shape)


@dataclass(frozen=True)
class QuantizationReport:
    mode: str
    layers: int
    quantized_parameters: int
    total_parameters: int
    bytes_before: int
    bytes_after: int

    def line(self) -> str:
        share = 100 * self.quantized_parameters / max(1, self.total_parameters)
        return (
            f"quantized {self.layers} Linear layers to {self.mode} ({share:.0f}% of the denoiser's parameters; "
            f"convolutions and small layers stay as stored): weights {self.bytes_before / 2**20:.1f} MiB -> "
            f"{self.bytes_after / 2**20:.1f} MiB"
        )


def quantize_linear_layers(
    model: nn.Module, mode: str, compute_dtype: torch.dtype, work_device: torch.device | None = None
) -> QuantizationReport:
    """Replace the nn.Linear layers of `model` by bitsandbytes layers holding their weights in `mode` (for 4-bit,
    those whose widths are multiples of 64: every large layer of real models; small output heads stay). fp8 and
    4-bit layers are quantized one at a time on `work_device` (a GPU does it much faster than the CPU) and their
    bytes come back to the model's device. With a work device, int8 layers are left for bitsandbytes to quantize
    when the model moves there (its int8 statistics do not follow a weight quantized before a move)."""
    from torch import nn

    bnb = _bitsandbytes() if mode in BITSANDBYTES_MODES else None
    before = _weight_bytes(model)
    total = sum(p.numel() for p in model.parameters())
    layers = quantized = 0
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or not quantizes(mode, tuple(module.weight.shape)):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if bnb is None:
            from lora_cli.models.float8 import Float8Linear

            layer = Float8Linear(module, compute_dtype, _inputs_in(compute_dtype), work_device)
        else:
            layer = _quantized(bnb, module, mode, compute_dtype, work_device)
        setattr(parent, child, layer)
        layers += 1
        quantized += module.weight.numel()
    if mode == "int8":
        model.is_loaded_in_8bit = True  # peft then wraps these layers with its bitsandbytes LoRA layers
    elif mode in ("nf4", "fp4"):
        model.is_loaded_in_4bit = True
    _leave_the_file(model)
    return QuantizationReport(mode, layers, quantized, total, before, _weight_bytes(model, mode))


def _leave_the_file(model: nn.Module) -> None:
    """Give the unquantized tensors (biases, norms, convolutions) memory of their own. diffusers memory-maps a
    file stored in the requested dtype, and while any tensor still points into the mapping, every page that
    quantizing read stays resident: the full-precision weights would count in RAM beside their quantized copies.
    Quantized weights are fresh already (and bitsandbytes keeps int8 statistics tied to the weight's tensor)."""
    for module in model.modules():
        for tensor in _unquantized_tensors(module):
            if tensor.device.type == "cpu":
                tensor.data = tensor.data.clone()


def _unquantized_tensors(module: nn.Module) -> list[torch.Tensor]:
    """`module`'s own parameters and buffers, or a quantized layer's bias only."""
    if getattr(module, "weight_is_quantized", False):
        return [module.bias] if module.bias is not None else []
    return [*module.parameters(recurse=False), *module.buffers(recurse=False)]


def _bitsandbytes():
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ModelLoadError("model.quantize needs bitsandbytes: pip install 'lora-cli[bnb]'") from None
    return bnb


def _quantized(
    bnb, linear: nn.Linear, mode: str, compute_dtype: torch.dtype, work_device: torch.device | None
) -> nn.Module:
    import torch
    from torch import nn

    from lora_cli.models.four_bit import TrainableLinear4bit

    weight = linear.weight.data
    device = weight.device
    has_bias = linear.bias is not None
    if mode == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight.to(torch.float16), requires_grad=False, has_fp16_weights=False)
    else:
        layer = TrainableLinear4bit(
            linear.in_features, linear.out_features, bias=has_bias, compute_dtype=compute_dtype, quant_type=mode
        )
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=mode)
        # bitsandbytes repacks 4-bit weights for its CPU inference kernel the first time a layer runs in eval
        # mode without gradients (a preview), and training afterwards then fails; keep the trainable layout.
        layer.support_avx512bf16_for_cpu = False
    layer.weight_is_quantized = True
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
    layer.register_forward_pre_hook(_inputs_in(compute_dtype))
    if work_device is None:
        return layer.to(device)  # moving to a device is what quantizes the weight
    if mode == "int8":
        # bitsandbytes quantizes an int8 weight when the model moves to the GPU (its documented path): its
        # statistics live beside the weight, and a weight quantized here would reach the GPU without them
        return layer
    return layer.to(work_device).to(device)  # quantized there, its packed bytes and statistics back here


def _inputs_in(dtype: torch.dtype):
    """A pre-hook that hands the layer its input in `dtype`. bitsandbytes returns its output in the dtype of its
    input, and on CUDA autocast runs LayerNorm in float32, so a bf16 model's activations left every 4-bit layer
    in float32 (twice the memory, float32 math downstream, a dtype warning from every bf16 RMSNorm); the
    nn.Linear it replaced returns the autocast dtype."""

    def cast(module: nn.Module, args: tuple) -> tuple | None:
        first = args[0]
        if first.is_floating_point() and first.dtype != dtype:
            return (first.to(dtype), *args[1:])
        return None

    return cast


def _weight_bytes(model: nn.Module, mode: str | None = None) -> int:
    """Bytes of the weights (parameters and buffers: fp8 bytes are buffers), a quantized layer's weight counted as
    `mode` stores it (an int8 weight left for bitsandbytes to quantize on the GPU still holds float16 here)."""
    total = 0
    for module in model.modules():
        if mode is not None and getattr(module, "weight_is_quantized", False):
            total += round(stored_bytes(mode, (module.out_features, module.in_features)))
        total += sum(t.numel() * t.element_size() for t in _unquantized_tensors(module))
    return total


def quantization_error(weight: torch.Tensor, mode: str) -> torch.Tensor:
    """What storing `weight` in `mode` changes: the dequantized weight minus the original (float32)."""
    weight = weight.float()
    if mode == "fp8":
        from lora_cli.models.float8 import to_float8

        stored, scale = to_float8(weight)
        return stored.float() * scale[:, None] - weight
    if mode == "int8":  # per output row, symmetric absmax, as LLM.int8's weight storage
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
        return (weight / scale).round() * scale - weight
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(weight.contiguous(), quant_type=mode)
    return F.dequantize_4bit(packed, state).float().reshape(weight.shape) - weight


def hidden_by_quantization(weight: torch.Tensor, delta: torch.Tensor, mode: str) -> bool:
    """Whether an adapter's update of this layer is smaller (RMS) than the layer's own quantization error:
    trained on the quantized base, such an update partly corrects the quantization and acts differently on
    a full-precision base."""
    if weight.dim() != 2:
        return False  # convolutions are never quantized
    error = quantization_error(weight, mode)
    return bool(delta.float().pow(2).mean().sqrt() < error.pow(2).mean().sqrt())


def trained_quantized(metadata: dict[str, str]) -> str | None:
    """The quantization of the base an adapter was trained on, from lora-cli's metadata (None if none)."""
    try:
        mode = json.loads(metadata.get("lora_cli.preset", "{}")).get("model", {}).get("quantize", "none")
    except (json.JSONDecodeError, AttributeError):
        return None
    return mode if mode in MODES else None


def hidden_warning(adapter: str, hidden: int, total: int, mode: str) -> str:
    return (
        f"{adapter}: {hidden} of {total} layers change less than their {mode} quantization error; trained on a "
        f"{mode}-quantized base, the adapter partly corrects that error, so on full-precision weights it acts "
        f"differently from its training previews (sample with --quantize {mode} to see those)"
    )
