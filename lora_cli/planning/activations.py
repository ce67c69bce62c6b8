"""Training activations of a denoiser, counted from its layer shapes (no model is built).

Autograd keeps the inputs of the ops whose backward needs them once a gradient flows through them: norms,
SiLU/GELU, attention (q, k, v, output), gated products, every convolution (even frozen: PyTorch's
convolution backward keeps its input), and each adapted layer's input; a frozen linear layer keeps nothing.
Elements per sample, with `C` channels and `n` latent tokens at a block's resolution
(`n = (resolution / 8)^2 / 4^level` for SD's UNet):

- ResNet block `cin -> cout`: norm1, SiLU and conv1 inputs `3 cin n`; norm2, SiLU, conv2 inputs `3 cout n`.
- Transformer2D: GroupNorm input `C n`, plus `C n` for each of proj_in/proj_out that is a 1x1 convolution.
- Transformer block: norm1 input and self-attention q, k, v, output `5 C n`; norm2 input and
  cross-attention q, output `3 C n` (+ k, v over the `M` text tokens); norm3 input `C n`; feed-forward
  projection output `P n` and, when gated (GEGLU, `P = 2F`), the gate's activation `F n`.
  SD1.5's block: `11 C n + 8 C n + 4 C n = 23 C n`.
- Down/upsampler: its convolution's input. Output head: GroupNorm, SiLU and conv_out inputs `3 C0 n0`.
- Adapted layers: the input where no other op keeps it (`C n` shared by q/k/v, the FF inputs), the rank-r
  LoRA product `r n`; DoRA also the base and LoRA outputs `2 out n`; LoHa and LoKr a weight-sized delta
  per layer (once per step, not per sample).
Nothing is kept before the first adapted layer (no input there needs a gradient). These counts match what
autograd's saved-tensor hooks report within a few percent (tests/test_plan.py; 1.7% at SD1.5 size).

With gradient checkpointing (diffusers' granularity: each ResNet and each transformer block) only the inputs
of checkpointed blocks and what the ops outside them keep stay; backward recomputes one block at a time,
so the largest block's own set is live on top.

An architecture supplies these counts as one `ActivationModel` under its `Architecture.name`: the UNets here
(`UNET_MODELS`), the diffusion transformers in `transformer_activations.py`; `estimate.ACTIVATION_MODELS`
holds them all.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class Activations:
    """Activation elements of one training step of the denoiser."""

    saved: float  # kept for backward, per sample, without checkpointing
    checkpointed: float  # kept for backward, per sample, with gradient checkpointing
    recompute: float  # the largest checkpointed block's own saved elements, per sample
    per_step: float = 0.0  # elements that do not grow with the batch (weight-sized adapter deltas)

    def peak(self, checkpointing: bool) -> float:
        """Elements per sample live at the start of backward."""
        return self.checkpointed + self.recompute if checkpointing else self.saved


@dataclass(frozen=True)
class DenoiserQuery:
    """What the activation count depends on besides the layer shapes."""

    layers: Shapes  # every layer of the denoiser: module name -> weight shape
    adapted: frozenset[str]  # module names that get an adapter
    rank: int
    full_delta: bool  # the algorithm's layers build their whole delta weight each forward (LoHa, LoKr)
    dora: bool
    latent_tokens: int  # tokens at the first block: (resolution / latent factor)^2 (x latent frames for video)
    text_tokens: int
    vectors: Shapes = field(default_factory=dict)  # the other weights (norm scales): tell optional norms apart


@dataclass
class _Stage:
    """One piece of the forward pass in execution order: what it keeps unwrapped and checkpointed."""

    full: float
    checkpointed: float
    adapted: bool
    recompute: float = 0.0


def unet_activations(query: DenoiserQuery) -> Activations:
    """Stable Diffusion's UNet2DConditionModel (down blocks, mid block, up blocks of ResNets and
    Transformer2D blocks), walked in execution order."""
    layers = query.layers
    stages = [_edge_in(query)]
    level = 0
    for block in _indexed(layers, "down_blocks"):
        stages += _unet_block(query, block, level, mid=False)
        if f"{block}.downsamplers.0.conv" in layers:
            stages.append(_sampler(query, f"{block}.downsamplers.0.conv", level, level + 1))
            level += 1
    stages += _unet_block(query, "mid_block", level, mid=True)
    for block in _indexed(layers, "up_blocks"):
        stages += _unet_block(query, block, level, mid=False)
        if f"{block}.upsamplers.0.conv" in layers:
            stages.append(_sampler(query, f"{block}.upsamplers.0.conv", level - 1, level - 1))
            level -= 1
    stages.append(_edge_out(query))
    first = next((i for i, stage in enumerate(stages) if stage.adapted), len(stages))
    kept = stages[first:]
    return Activations(
        saved=sum(s.full for s in kept),
        checkpointed=sum(s.checkpointed for s in kept),
        recompute=max((s.recompute for s in kept), default=0.0),
        per_step=_delta_weights(query),
    )


def _unet_block(query: DenoiserQuery, block: str, level: int, mid: bool) -> list[_Stage]:
    resnets = _indexed(query.layers, f"{block}.resnets")
    attentions = _indexed(query.layers, f"{block}.attentions")
    if mid:  # resnet, then (attention, resnet) pairs
        order = [resnets[0], *[x for k, r in enumerate(resnets[1:]) for x in (*attentions[k : k + 1], r)]]
    else:  # (resnet, attention) pairs
        order = [x for k, r in enumerate(resnets) for x in (r, *attentions[k : k + 1])]
    return [_resnet(query, name, level) if ".resnets." in name else _transformer(query, name, level) for name in order]


def _resnet(query: DenoiserQuery, prefix: str, level: int) -> _Stage:
    out_channels, in_channels = query.layers[f"{prefix}.conv1"][:2]
    n = _tokens(query, level)
    full = 3 * in_channels * n + 3 * out_channels * n + _ranks(query, prefix, n)
    return _Stage(full, in_channels * n, _any_adapted(query, prefix), recompute=full)


def _transformer(query: DenoiserQuery, prefix: str, level: int) -> _Stage:
    layers, n = query.layers, _tokens(query, level)
    channels = layers[f"{prefix}.proj_in"][0]
    outer = channels * n + sum(
        _layer_input(query, f"{prefix}.{name}", channels * n) for name in ("proj_in", "proj_out")
    )
    outer += _ranks(query, f"{prefix}.proj_in", n) + _ranks(query, f"{prefix}.proj_out", n)
    blocks = [_transformer_block(query, name, channels, n) for name in _indexed(layers, f"{prefix}.transformer_blocks")]
    return _Stage(
        outer + sum(blocks),
        outer + len(blocks) * channels * n,
        _any_adapted(query, prefix),
        recompute=max(blocks, default=0.0),
    )


def _transformer_block(query: DenoiserQuery, prefix: str, channels: int, n: int) -> float:
    layers, m = query.layers, query.text_tokens
    kept = 5 * channels * n  # norm1 input; self-attention q, k, v, output (which to_out reads in place)
    kept += _input_if(query, [f"{prefix}.attn1.to_{x}" for x in "qkv"], channels * n)
    if f"{prefix}.attn2.to_k" in layers:
        context = layers[f"{prefix}.attn2.to_k"][1]
        kept += 3 * channels * n + 2 * channels * m  # norm2 input; cross-attention q, output; k, v
        kept += _input_if(query, f"{prefix}.attn2.to_q", channels * n)
        kept += _input_if(query, [f"{prefix}.attn2.to_k", f"{prefix}.attn2.to_v"], context * m)
    projected, inner = layers[f"{prefix}.ff.net.0.proj"][0], layers[f"{prefix}.ff.net.2"][1]
    kept += channels * n + projected * n + (inner * n if projected == 2 * inner else 0)  # norm3; GELU/GEGLU
    kept += _input_if(query, f"{prefix}.ff.net.0.proj", channels * n) + _input_if(
        query, f"{prefix}.ff.net.2", inner * n
    )
    return kept + _ranks(query, prefix, n)


def _sampler(query: DenoiserQuery, conv: str, in_level: int, out_level: int) -> _Stage:
    """A down- or upsampling convolution: keeps its (upsampled) input."""
    channels = query.layers[conv][1]
    kept = channels * _tokens(query, min(in_level, out_level)) + _ranks(query, conv, _tokens(query, out_level))
    return _Stage(kept, kept, conv in query.adapted)


def _edge_in(query: DenoiserQuery) -> _Stage:
    """conv_in and the time embedding: their inputs never need a gradient."""
    n = _tokens(query, 0)
    adapted = "conv_in" in query.adapted or any(name.startswith("time_embedding.") for name in query.adapted)
    kept = _ranks(query, "conv_in", n)
    return _Stage(kept, kept, adapted)


def _edge_out(query: DenoiserQuery) -> _Stage:
    """conv_norm_out, SiLU and conv_out inputs."""
    channels = query.layers["conv_out"][1]
    kept = 3 * channels * _tokens(query, 0) + _ranks(query, "conv_out", _tokens(query, 0))
    return _Stage(kept, kept, "conv_out" in query.adapted)


def _delta_weights(query: DenoiserQuery) -> float:
    """LoHa and LoKr build each adapted layer's full delta weight, kept for the layer's backward."""
    if not query.full_delta:
        return 0.0
    return float(sum(math.prod(query.layers[name]) for name in query.adapted if name in query.layers))


def _ranks(query: DenoiserQuery, prefix: str, n: int) -> float:
    """LoRA keeps its rank-r intermediate per adapted layer; DoRA also the base and LoRA outputs."""
    adapted = [name for name in query.adapted if name == prefix or name.startswith(prefix + ".")]
    if query.full_delta:
        return 0.0
    total = query.rank * n * len(adapted)
    if query.dora:
        total += sum(2 * query.layers[name][0] * n for name in adapted)
    return total


def _input_if(query: DenoiserQuery, names: str | list[str], size: float) -> float:
    """`size` when any of the layers (which share one input) is adapted."""
    names = [names] if isinstance(names, str) else names
    return size if any(name in query.adapted for name in names) else 0.0


def _layer_input(query: DenoiserQuery, name: str, size: float) -> float:
    """A convolution keeps its input even when frozen; a frozen linear layer keeps nothing."""
    return size if len(query.layers[name]) == 4 or name in query.adapted else 0.0


def _any_adapted(query: DenoiserQuery, prefix: str) -> bool:
    return any(name.startswith(prefix + ".") for name in query.adapted)


def _tokens(query: DenoiserQuery, level: int) -> int:
    side = max(1, round(query.latent_tokens**0.5) >> level)
    return side * side


def _indexed(layers: Shapes, prefix: str) -> list[str]:
    """`prefix.0`, `prefix.1`, ... for every index some layer name has under `prefix`."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    found = {int(m.group(1)) for name in layers if (m := pattern.match(name))}
    return [f"{prefix}.{i}" for i in sorted(found)]


def clip_text_activations(layers: Shapes, adapted: frozenset[str], rank: int, tokens: int) -> float:
    """Elements per sample a CLIP-style text encoder keeps when its adapter trains: per layer the two
    LayerNorm inputs, attention q, k, v and output (`6 D M`), the MLP activation's input `F M`, and the
    adapted layers' inputs and rank-r products."""
    total = 0.0
    for prefix in _indexed(layers, "text_model.encoder.layers"):
        inner, width = layers[f"{prefix}.mlp.fc1"]
        total += 6 * width * tokens + inner * tokens
        inputs = (([f"{prefix}.self_attn.{x}_proj" for x in "qkv"], width), ([f"{prefix}.self_attn.out_proj"], width),
                  ([f"{prefix}.mlp.fc1"], width), ([f"{prefix}.mlp.fc2"], inner))  # fmt: skip
        total += sum(size * tokens for names, size in inputs if adapted.intersection(names))
        total += rank * tokens * sum(1 for name in adapted if name.startswith(prefix + "."))
    return total


def unet_blocks(layers: Shapes) -> list[str]:
    """Block prefixes in execution order, as `adapter.late` counts them."""
    return [*_indexed(layers, "down_blocks"), "mid_block", *_indexed(layers, "up_blocks")]


def vae_encode_elements(layers: Shapes, pixels: int, frames: int = 1) -> float:
    """Elements live while an 8x VAE encodes one image (`pixels` per frame; images have one) without
    gradients: five full-resolution feature maps of the first block's width (measured: 640 MiB for a 512 px
    image through SD's VAE in float32)."""
    return 5 * layers["encoder.conv_in"][0] * pixels * frames


@dataclass(frozen=True)
class ActivationModel:
    """What the planner knows of one architecture: activation counts, block order, pixels per token side,
    frames per latent frame (video), and CLIP tokens placed before T5's in the denoiser's text context."""

    denoiser: Callable[[DenoiserQuery], Activations]
    text_encoder: Callable[[Shapes, frozenset[str], int, int], float]
    vae_encode: Callable[[Shapes, int, int], float]  # VAE weight shapes (any rank), pixels per frame, frames
    blocks: Callable[[Shapes], list[str]]
    latent_factor: int = 8
    temporal_factor: int = 0  # video: latent frames = (frames - 1) // temporal_factor + 1; 0 for images
    clip_tokens: int = 0


UNET_MODEL = ActivationModel(unet_activations, clip_text_activations, vae_encode_elements, unet_blocks)
UNET_MODELS: dict[str, ActivationModel] = {"stable-diffusion": UNET_MODEL, "stable-diffusion-xl": UNET_MODEL}
