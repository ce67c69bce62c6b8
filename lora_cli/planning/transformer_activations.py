"""Training activations of the diffusion transformers (Flux, SD3, PixArt, Wan), counted from layer shapes.

Same approach as the UNet count in `activations.py`: the elements autograd keeps for backward, per sample.
With `C` the model width, `F` the feed-forward width, `n` image tokens (Flux packs 2x2 latent patches into
tokens, SD3 and PixArt patchify 2x2 inside the model, Wan 1x2x2 over the latent frames), `M` text tokens and
`T = n + M` the tokens of a joint (MMDiT) attention:

- AdaLN-modulated LayerNorm over `t` tokens: its input `C t`; when the modulation needs a gradient (an
  adapter on a time-embedding or modulation layer), also the normalised tensor `C t` and each gated
  residual's other operand `C t`.
- Attention: SDPA keeps q, k, v and the output (`4 C T` joint, `2 C n + 2 C M` cross); RMS q/k norms
  (Flux, Wan, SD3.5) their inputs `2 C T`; diffusers' processor copies the output before `to_out` in SD3 and
  PixArt (`C T`, kept when `to_out` is adapted) but not in Flux and Wan (the view of SDPA's output).
- Feed-forward (GELU-tanh): the GELU input `F t`.
- Adapted layers: their input where nothing else keeps it (`C t` shared by q/k/v, `C t` and `F t` for the
  feed-forward), the rank-r LoRA product `r t`, DoRA also `2 out t`. Per-token statistics (LayerNorm mean
  and rstd, RMS scales, SDPA's logsumexp) are left out: under 1% at real widths.
- Text states that every cross-attention reads (PixArt, Wan) are kept once, not per block.
Flux's double block keeps `8 C T + F T`, its single block `7 C T + F T` (+ `C T` with adapted q/k/v).

Nothing is kept before the first adapted block. With gradient checkpointing (diffusers checkpoints each
transformer block) only each block's hidden-state inputs stay, plus the largest block's own set.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from lora_cli.planning.activations import (
    ActivationModel,
    Activations,
    DenoiserQuery,
    Shapes,
    _delta_weights,
    _indexed,
    _Stage,
    clip_text_activations,
    vae_encode_elements,
)

# Layers whose outputs condition every block: an adapter on one makes the AdaLN modulation need gradients.
CONDITIONING = (
    "time_text_embed.",
    "adaln_single.",
    "condition_embedder.time",
    "t_embedder.",
    "time_guidance_embed.",
    "double_stream_modulation_",
    "single_stream_modulation.",
)
# A block's own modulation layers (Flux/SD3 `norm1.linear`, PixArt `scale_shift_table`, Qwen-Image `img_mod`,
# Z-Image `adaLN_modulation`).
MODULATION = ("norm", "scale_shift", "img_mod", "txt_mod", "adaLN_modulation")


def flux_activations(query: DenoiserQuery) -> Activations:
    """FluxTransformer2DModel: double-stream (MMDiT) blocks, then single-stream blocks over `T` tokens."""
    layers, n, m = query.layers, query.latent_tokens, query.text_tokens
    width = layers["x_embedder"][0]
    stages = [_embedders(query, [("x_embedder", n), ("context_embedder", m)])]
    for block in _indexed(layers, "transformer_blocks"):
        stages.append(_joint_block(query, block, width, out_copy=False, qk_norm=True))
    for block in _indexed(layers, "single_transformer_blocks"):
        stages.append(_single_block(query, block, width))
    stages.append(_head(query, width))
    return _total(query, stages, rope=2 * (n + m) * _head_dim(query))


def sd3_activations(query: DenoiserQuery) -> Activations:
    """SD3Transformer2DModel: MMDiT blocks (the last without the text stream's feed-forward)."""
    layers, m = query.layers, query.text_tokens
    width = layers["context_embedder"][0]
    stages = [_embedders(query, [("pos_embed.proj", query.latent_tokens), ("context_embedder", m)])]
    for block in _indexed(layers, "transformer_blocks"):
        qk_norm = f"{block}.attn.norm_q.weight" in query.vectors
        stages.append(_joint_block(query, block, width, out_copy=True, qk_norm=qk_norm))
    stages.append(_head(query, width))
    return _total(query, stages)


def pixart_activations(query: DenoiserQuery) -> Activations:
    """PixArtTransformer2DModel: self-attention, cross-attention to T5 states, feed-forward, AdaLN-single."""
    layers, m = query.layers, query.text_tokens
    width = layers["caption_projection.linear_2"][0]
    stages = [_embedders(query, [("pos_embed.proj", query.latent_tokens), ("caption_projection.linear_1", m)])]
    for block in _indexed(layers, "transformer_blocks"):
        stages.append(_cross_block(query, block, width, ("attn1", "attn2", "ff"), wan=False))
    stages.append(_head(query, width))
    return _total(query, stages, shared=_text_states(query, width))


def wan_activations(query: DenoiserQuery) -> Activations:
    """WanTransformer3DModel: like PixArt's blocks, with RMS q/k norms and a LayerNorm before cross-attention."""
    layers, m = query.layers, query.text_tokens
    width = layers["proj_out"][1]
    stages = [_embedders(query, [("condition_embedder.text_embedder.linear_1", m)])]
    for block in _indexed(layers, "blocks"):
        stages.append(_cross_block(query, block, width, ("attn1", "attn2", "ffn"), wan=True))
    stages.append(_head(query, width))
    return _total(query, stages, shared=_text_states(query, width))


def _joint_block(
    query: DenoiserQuery,
    prefix: str,
    width: int,
    out_copy: bool,
    qk_norm: bool,
    mlps: tuple[str, str] = ("ff", "ff_context"),
) -> _Stage:
    """An MMDiT block: each stream (image `n`, text `M` tokens) normalised and projected on its own, one joint
    attention over both, then each stream's feed-forward, named `mlps` (the last SD3 block has no text one)."""
    layers, n, m = query.layers, query.latent_tokens, query.text_tokens
    joint, cond = n + m, _conditioned(query, prefix)
    kept = (4 + (2 if qk_norm else 0)) * width * joint  # SDPA q, k, v, output; RMS q/k norm inputs
    if out_copy and _adapted(query, f"{prefix}.attn.to_out.0", f"{prefix}.attn.to_add_out"):
        kept += width * joint
    streams = [(mlps[0], "to_q", "to_k", "to_v", n), (mlps[1], "add_q_proj", "add_k_proj", "add_v_proj", m)]
    for mlp, *projections, tokens in streams:
        kept += width * tokens * (1 + cond)  # norm1 input; the normalised tensor when the modulation trains
        kept += width * tokens * _adapted(query, *(f"{prefix}.attn.{name}" for name in projections))
        if f"{prefix}.{mlp}.net.0.proj" in layers:
            kept += width * tokens * (1 + 3 * cond)  # norm2; normalised, and both gates' other operands
            kept += _feed_forward(query, f"{prefix}.{mlp}.net", width, tokens)
    if f"{prefix}.attn2.to_q" in layers:  # SD3.5 medium's second image self-attention (no tiny model checks it)
        kept += width * n * (6 + 2 * cond + _adapted(query, *(f"{prefix}.attn2.to_{x}" for x in "qkv")))
    kept += _ranks(query, prefix, _joint_tokens)
    return _block_stage(query, prefix, kept, width * joint)


def _single_block(query: DenoiserQuery, prefix: str, width: int) -> _Stage:
    """Flux's single-stream block over `T` tokens: one norm feeding attention and the MLP in parallel, and
    `proj_out` over both outputs side by side."""
    layers, joint = query.layers, query.latent_tokens + query.text_tokens
    cond = _conditioned(query, prefix)
    hidden = layers[f"{prefix}.proj_mlp"][0]
    kept = width * joint * (1 + 6 + cond) + hidden * joint  # norm input; SDPA and q/k norms; GELU input
    inputs = (f"{prefix}.proj_mlp", *(f"{prefix}.attn.to_{x}" for x in "qkv"))
    kept += width * joint * _adapted(query, *inputs)
    kept += (width + hidden) * joint * _adapted(query, f"{prefix}.proj_out")
    kept += width * joint * cond  # the gate's other operand
    return _block_stage(query, prefix, kept + _ranks(query, prefix, _joint_tokens), width * joint)


def _cross_block(query: DenoiserQuery, prefix: str, width: int, names: tuple[str, str, str], wan: bool) -> _Stage:
    """Self-attention over `n` image tokens, cross-attention to `M` text tokens, feed-forward (PixArt, Wan:
    which adds RMS q/k norms and a LayerNorm before cross-attention)."""
    n, m = query.latent_tokens, query.text_tokens
    self_attention, cross, ff = (f"{prefix}.{name}" for name in names)
    cond = _conditioned(query, prefix)
    kept = width * n * (1 + cond) + (4 + 2 * wan) * width * n  # norm1 (+ normalised); SDPA; q/k norms
    kept += width * n * _adapted(query, *(f"{self_attention}.to_{x}" for x in "qkv"))
    kept += width * n * cond  # the gate's other operand
    kept += 2 * width * n + 2 * width * m + wan * width * (n + m)  # cross-attention SDPA; q/k norms
    kept += width * n * wan + width * n * _adapted(query, f"{cross}.to_q")  # its LayerNorm; to_q input
    kept += width * n * (1 + 2 * cond) + _feed_forward(query, f"{ff}.net", width, n)  # norm; gate operands
    return _block_stage(query, prefix, kept + _ranks(query, prefix, _cross_tokens), width * n)


def _feed_forward(query: DenoiserQuery, prefix: str, width: int, tokens: int) -> float:
    """GELU input `F t`; the adapted projections' inputs (`C t` and the GELU output `F t`)."""
    hidden = query.layers[f"{prefix}.0.proj"][0]
    kept = hidden * tokens + width * tokens * _adapted(query, f"{prefix}.0.proj")
    return kept + hidden * tokens * _adapted(query, f"{prefix}.2")


def _embedders(query: DenoiserQuery, inputs: list[tuple[str, int]]) -> _Stage:
    """Patch and text embedders: an adapted one keeps its input (the latents, the text states)."""
    kept = 0.0
    for name, tokens in inputs:
        if name in query.adapted:
            kept += math.prod(query.layers[name][1:]) * tokens + _layer_ranks(query, name, tokens)
    adapted = any(name in query.adapted for name, _ in inputs) or _conditioned(query, "")
    return _Stage(kept, kept, adapted)


def _head(query: DenoiserQuery, width: int) -> _Stage:
    """norm_out (AdaLN-continuous) and proj_out over the image tokens."""
    n = query.latent_tokens
    cond = _conditioned(query, "") or "norm_out.linear" in query.adapted
    kept = width * n * (1 + cond) + width * n * _adapted(query, "proj_out")
    kept += _layer_ranks(query, "proj_out", n)
    return _Stage(kept, kept, "proj_out" in query.adapted)


def _text_states(query: DenoiserQuery, width: int) -> float:
    """Text states read by every cross-attention: kept once when some block's to_k/to_v is adapted."""
    adapted = any(name.endswith(("attn2.to_k", "attn2.to_v")) for name in query.adapted)
    return width * query.text_tokens if adapted else 0.0


def _block_stage(query: DenoiserQuery, prefix: str, kept: float, inputs: float) -> _Stage:
    adapted = any(name.startswith(prefix + ".") for name in query.adapted)
    return _Stage(kept, inputs, adapted, recompute=kept)


def _total(query: DenoiserQuery, stages: list[_Stage], rope: float = 0.0, shared: float = 0.0) -> Activations:
    """Stages from the first adapted one on, plus what the model keeps once (rotary tables, text states)."""
    first = next((i for i, stage in enumerate(stages) if stage.adapted), len(stages))
    kept = stages[first:]
    rope, shared = (rope, shared) if kept else (0.0, 0.0)
    return Activations(  # the rotary tables are kept only inside blocks, so not with checkpointing
        saved=rope + shared + sum(s.full for s in kept),
        checkpointed=shared + sum(s.checkpointed for s in kept),
        recompute=max((s.recompute for s in kept), default=0.0),
        per_step=_delta_weights(query),
    )


def _conditioned(query: DenoiserQuery, prefix: str) -> bool:
    """Whether the block's AdaLN modulation needs a gradient: an adapter on a conditioning layer or its own
    modulation layer."""
    own = tuple(f"{prefix}.{name}" for name in MODULATION) if prefix else ()
    return any(name.startswith((*CONDITIONING, *own)) for name in query.adapted)


def _adapted(query: DenoiserQuery, *names: str) -> bool:
    return any(name in query.adapted for name in names)


def _joint_tokens(query: DenoiserQuery, name: str) -> int:
    """Tokens an MMDiT layer sees: modulation layers one, text-stream layers `M`, single blocks `T`, else `n`."""
    if any(f".{part}" in name for part in MODULATION):
        return 1
    if name.startswith("single_transformer_blocks."):
        return query.latent_tokens + query.text_tokens
    if any(part in name for part in (".add_", ".to_add_out", ".ff_context.", ".txt_mlp.")):
        return query.text_tokens
    return query.latent_tokens


def _cross_tokens(query: DenoiserQuery, name: str) -> int:
    """Cross-attention keys and values see the `M` text tokens, everything else the `n` image tokens."""
    if name.endswith(("attn2.to_k", "attn2.to_v")):
        return query.text_tokens
    return query.latent_tokens


def _ranks(query: DenoiserQuery, prefix: str, tokens_of: Callable[[DenoiserQuery, str], int]) -> float:
    inside = [name for name in query.adapted if name.startswith(prefix + ".")]
    return sum(_layer_ranks(query, name, tokens_of(query, name)) for name in inside)


def _layer_ranks(query: DenoiserQuery, name: str, tokens: int) -> float:
    """LoRA's rank-r intermediate; DoRA also the base and LoRA outputs (LoHa/LoKr: see `per_step`)."""
    if name not in query.adapted or query.full_delta:
        return 0.0
    return query.rank * tokens + (2 * query.layers[name][0] * tokens if query.dora else 0)


def _head_dim(query: DenoiserQuery) -> int:
    """Flux's attention head width, from its q-norm scale when known (128 in FLUX.1)."""
    for name in query.vectors:
        if name.endswith("attn.norm_q.weight"):
            return query.vectors[name][0]
    return 128


def text_encoder_activations(layers: Shapes, adapted: frozenset[str], rank: int, tokens: int) -> float:
    """A CLIP (`activations.clip_text_activations`) or T5/UMT5 text encoder whose adapter trains."""
    if any(name.startswith("text_model.") for name in layers):
        return clip_text_activations(layers, adapted, rank, tokens)
    return t5_text_activations(layers, adapted, rank, tokens)


def t5_text_activations(layers: Shapes, adapted: frozenset[str], rank: int, tokens: int) -> float:
    """Elements per sample a T5/UMT5 encoder keeps in training mode (dropout on, its masks as large as the
    tensors): per layer two RMSNorm inputs and two residual dropout masks `4 D M`; attention written out (not
    SDPA): q, k, v `3 I M`, the softmax output, its dropout mask and dropped-out copy `3 h M^2`; the MLP
    `7 F M` when gated (tanh-GELU's intermediate tensors, the product's operands, the dropout mask; T5 v1.1,
    UMT5) or `2 F M` with ReLU; and the adapted layers' inputs and rank-r products."""
    total = 0.0
    for prefix in _indexed(layers, "encoder.block"):
        attention, mlp = f"{prefix}.layer.0.SelfAttention", f"{prefix}.layer.1.DenseReluDense"
        inner, width = layers[f"{attention}.q"]
        heads = _t5_heads(layers, attention, inner)
        gated = f"{mlp}.wi_0" in layers
        hidden = layers[f"{mlp}.wi_0" if gated else f"{mlp}.wi"][0]
        total += 4 * width * tokens + 3 * inner * tokens + 3 * heads * tokens**2
        total += (7 if gated else 2) * hidden * tokens
        inputs = (([f"{attention}.{x}" for x in "qkv"], width), ([f"{attention}.o"], inner),
                  ([f"{mlp}.wi", f"{mlp}.wi_0", f"{mlp}.wi_1"], width), ([f"{mlp}.wo"], hidden))  # fmt: skip
        total += sum(size * tokens for names, size in inputs if adapted.intersection(names))
        total += rank * tokens * sum(1 for name in adapted if name.startswith(prefix + "."))
    return total


def _t5_heads(layers: Shapes, attention: str, inner: int) -> int:
    """Heads from the relative-position table (the first layer holds it; T5 shares it, UMT5 has one per layer)."""
    for name, shape in layers.items():
        if name.endswith("relative_attention_bias"):
            return shape[1]
    return max(1, inner // 64)


def wan_vae_encode_elements(layers: Shapes, pixels: int, frames: int) -> float:
    """Elements live while Wan's causal 3D VAE encodes one clip without gradients. It encodes the first frame,
    then chunks of four, each causal convolution caching its input's last two frames, so the cost hardly
    grows with the clip: the clip itself, plus 48 full-resolution maps of the first width (fitted on the RSS
    growth of diffusers' AutoencoderKLWan in Wan 2.1's layout, width 32 and 96, 256-512 px, 9-33 frames,
    float32 on the CPU: 44-66 maps; a rough estimate, not measured on a GPU)."""
    return 3 * pixels * frames + 48 * layers["encoder.conv_in"][0] * pixels


def flux_blocks(layers: Shapes) -> list[str]:
    return [*_indexed(layers, "transformer_blocks"), *_indexed(layers, "single_transformer_blocks")]


def mmdit_blocks(layers: Shapes) -> list[str]:
    return _indexed(layers, "transformer_blocks")


def wan_blocks(layers: Shapes) -> list[str]:
    return _indexed(layers, "blocks")


# Latent factor 16: an 8x VAE and 2x2 patches (packed by the pipeline for Flux, inside the model otherwise).
DIT_MODELS: dict[str, ActivationModel] = {
    "flux": ActivationModel(flux_activations, text_encoder_activations, vae_encode_elements, flux_blocks, 16),
    "stable-diffusion-3": ActivationModel(
        sd3_activations, text_encoder_activations, vae_encode_elements, mmdit_blocks, 16, clip_tokens=77
    ),
    "pixart": ActivationModel(pixart_activations, text_encoder_activations, vae_encode_elements, mmdit_blocks, 16),
    "wan": ActivationModel(
        wan_activations, text_encoder_activations, wan_vae_encode_elements, wan_blocks, 16, temporal_factor=4
    ),
}
