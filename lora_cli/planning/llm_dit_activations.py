"""Training activations of the DiTs that read an LLM's hidden states (Z-Image, Qwen-Image), counted from layer
shapes as in `transformer_activations` (same notation: `C` width, `F` feed-forward width, `n` image tokens,
`M` text tokens, `T = n + M`).

- Qwen-Image's blocks are MMDiT blocks (Flux's double-stream pattern under other names: `img_mlp`/`txt_mlp`,
  `img_mod`/`txt_mod`), whose attention processor copies SDPA's output before `to_out`; without checkpointing
  the blocks keep the rotary tables (the image tokens' and the whole 4096-position text table they slice).
- Z-Image runs two noise-refiner blocks over the `n` image tokens, two context-refiner blocks (no modulation)
  over the `M` text tokens, then single-stream blocks over `T`; it pads both sequences to multiples of 32.
  Each block keeps its four sandwich RMSNorms' inputs `4 C t`, the RMS q/k norms' inputs `2 C t`, SDPA's
  q, k, v and output `4 C t` and SwiGLU's three `F t` tensors (w1's and w3's outputs, the SiLU); the complex
  rotary tables of the three sequences (`2 T` head widths) are inputs of every block, so kept either way, and
  the final layer runs over `T` tokens.
"""

from __future__ import annotations

import math

from lora_cli.planning.activations import (
    ActivationModel,
    Activations,
    DenoiserQuery,
    Shapes,
    _indexed,
    _Stage,
    vae_encode_elements,
)
from lora_cli.planning.transformer_activations import (
    _adapted,
    _block_stage,
    _conditioned,
    _embedders,
    _head,
    _head_dim,
    _joint_block,
    _joint_tokens,
    _layer_ranks,
    _ranks,
    _single_block,
    _total,
    flux_activations,
    flux_blocks,
    text_encoder_activations,
)

REFINER = "context_embedder.token_refiner.refiner_blocks"
QWEN_ROPE_POSITIONS = 4096  # QwenEmbedRope's precomputed positions
PADDING = 32  # Z-Image pads image and caption tokens to multiples of this


def qwen_image_activations(query: DenoiserQuery) -> Activations:
    """QwenImageTransformer2DModel: MMDiT blocks over [text; image] with RMS q/k norms."""
    width = query.layers["img_in"][0]
    stages = [_embedders(query, [("img_in", query.latent_tokens), ("txt_in", query.text_tokens)])]
    for block in _indexed(query.layers, "transformer_blocks"):
        stages.append(_joint_block(query, block, width, out_copy=True, qk_norm=True, mlps=("img_mlp", "txt_mlp")))
    stages.append(_head(query, width))
    # complex rotary tables: the image tokens', and the text's as views of the 4096-position table
    return _total(query, stages, rope=(QWEN_ROPE_POSITIONS + query.latent_tokens) * _head_dim(query))


def z_image_activations(query: DenoiserQuery) -> Activations:
    """ZImageTransformer2DModel: noise refiners (image), context refiners (text), joint single-stream layers."""
    layers = query.layers
    n, m = _padded(query.latent_tokens), _padded(query.text_tokens)
    width = layers["cap_embedder.1"][0]
    embedders = [(name, n) for name in layers if name.startswith("all_x_embedder.")] + [("cap_embedder.1", m)]
    stages = [_embedders(query, embedders)]
    for group, tokens in (("noise_refiner", n), ("context_refiner", m)):
        for block in _indexed(layers, group):  # checkpointed, their inputs are kept even where nothing trains
            stage = _sandwich_block(query, block, width, tokens)
            stages.append(stage if stage.adapted else _Stage(0.0, stage.checkpointed, True))
    stages += [_sandwich_block(query, block, width, n + m) for block in _indexed(layers, "layers")]
    final = next((name for name in layers if name.startswith("all_final_layer.") and name.endswith(".linear")), "")
    joint = n + m  # the final layer runs over the joint sequence and drops the text after it
    scaled = _conditioned(query, "") or any(name.startswith("all_final_layer.") for name in query.adapted)
    kept = width * joint * (1 + scaled + _adapted(query, final)) + _layer_ranks(query, final, joint)
    stages.append(_Stage(kept, kept, final in query.adapted))
    head_dim = next(
        (shape[0] for name, shape in query.vectors.items() if name.endswith("attention.norm_q.weight")), 128
    )
    rope = 2 * joint * head_dim  # complex rotary tables per token (image, caption, joint), inputs of every block
    return _total(query, stages, shared=rope)


def flux2_activations(query: DenoiserQuery) -> Activations:
    """Flux2Transformer2DModel: MMDiT blocks with SwiGLU feed-forwards, then parallel single-stream blocks; one
    modulation shared by all blocks of a kind."""
    layers, n, m = query.layers, query.latent_tokens, query.text_tokens
    width = layers["x_embedder"][0]
    stages = [_embedders(query, [("x_embedder", n), ("context_embedder", m)])]
    for block in _indexed(layers, "transformer_blocks"):
        stages.append(_flux2_double_block(query, block, width))
    for block in _indexed(layers, "single_transformer_blocks"):
        stages.append(_flux2_single_block(query, block, width))
    stages.append(_head(query, width))
    return _total(query, stages, rope=2 * (n + m) * _head_dim(query))


def _flux2_double_block(query: DenoiserQuery, prefix: str, width: int) -> _Stage:
    """Per stream: LayerNorm inputs `2 C t`, SwiGLU's `linear_in` output `2 F t` and SiLU output `F t`; joint
    SDPA `4 C T` and RMS q/k inputs `2 C T`."""
    n, m = query.latent_tokens, query.text_tokens
    hidden = query.layers[f"{prefix}.ff.linear_out"][1]
    cond = _conditioned(query, prefix)
    kept = 6 * width * (n + m)
    streams = [("ff", ("to_q", "to_k", "to_v"), n), ("ff_context", ("add_q_proj", "add_k_proj", "add_v_proj"), m)]
    for ff, projections, tokens in streams:
        kept += width * tokens * (2 + 4 * cond) + 3 * hidden * tokens
        kept += width * tokens * _adapted(query, *(f"{prefix}.attn.{name}" for name in projections))
        kept += width * tokens * _adapted(query, f"{prefix}.{ff}.linear_in")
        kept += hidden * tokens * _adapted(query, f"{prefix}.{ff}.linear_out")
    return _block_stage(query, prefix, kept + _ranks(query, prefix, _joint_tokens), width * (n + m))


def _flux2_single_block(query: DenoiserQuery, prefix: str, width: int) -> _Stage:
    """Over `T` tokens: the norm's input `C`, the fused q/k/v + MLP-in output `3 C + 2 F` (q, k, v and the MLP's
    halves are views of it), the rotated q, k and SDPA's output `3 C`, the SiLU output `F`."""
    joint = query.latent_tokens + query.text_tokens
    hidden = (query.layers[f"{prefix}.attn.to_qkv_mlp_proj"][0] - 3 * width) // 2
    cond = _conditioned(query, prefix)
    kept = (7 * width + 3 * hidden) * joint + 2 * width * joint * cond
    kept += width * joint * _adapted(query, f"{prefix}.attn.to_qkv_mlp_proj")
    kept += (width + hidden) * joint * _adapted(query, f"{prefix}.attn.to_out")
    return _block_stage(query, prefix, kept + _ranks(query, prefix, _joint_tokens), width * joint)


def hunyuan_video_activations(query: DenoiserQuery) -> Activations:
    """HunyuanVideoTransformer3DModel: the token refiner's blocks over the `M` text tokens, then Flux's double-
    and single-stream blocks (the same module names), rotary tables for the image tokens."""
    layers, n, m = query.layers, query.latent_tokens, query.text_tokens
    width = layers["proj_out"][1]  # (the patch embedding is a 3D convolution, which adapters leave alone)
    stages = [_embedders(query, [("context_embedder.proj_in", m)])]
    stages += [_refiner_block(query, block, width) for block in _indexed(layers, REFINER)]
    for block in _indexed(layers, "transformer_blocks"):
        stages.append(_joint_block(query, block, width, out_copy=False, qk_norm=True))
    stages += [_single_block(query, block, width) for block in _indexed(layers, "single_transformer_blocks")]
    stages.append(_head(query, width))
    return _total(query, stages, rope=2 * n * _head_dim(query))


def _refiner_block(query: DenoiserQuery, prefix: str, width: int) -> _Stage:
    """A token-refiner block over `M` tokens: LayerNorm inputs `2 C M`, SDPA `4 C M`, the GELU's input `F M`,
    the adapted layers' inputs (none of them checkpointed)."""
    m = query.text_tokens
    hidden = query.layers[f"{prefix}.ff.net.0.proj"][0]
    kept = 6 * width * m + hidden * m
    kept += width * m * _adapted(query, *(f"{prefix}.attn.to_{x}" for x in "qkv"))
    kept += width * m * _adapted(query, f"{prefix}.attn.to_out.0")
    kept += width * m * _adapted(query, f"{prefix}.ff.net.0.proj") + hidden * m * _adapted(query, f"{prefix}.ff.net.2")
    inside = [name for name in query.adapted if name.startswith(prefix + ".")]
    kept += sum(_layer_ranks(query, name, m) for name in inside)
    adapted = bool(inside)
    return _Stage(kept, kept, adapted)


def _padded(tokens: int) -> int:
    return math.ceil(tokens / PADDING) * PADDING


def _sandwich_block(query: DenoiserQuery, prefix: str, width: int, tokens: int) -> _Stage:
    """A Z-Image block over `tokens`: RMSNorm before and after attention and the SwiGLU feed-forward, AdaLN
    scales and tanh gates from `adaLN_modulation` (the context refiners have none)."""
    hidden = query.layers[f"{prefix}.feed_forward.w1"][0]
    modulated = f"{prefix}.adaLN_modulation.0" in query.layers
    cond = modulated and _conditioned(query, prefix)
    kept = 10 * width * tokens + 3 * hidden * tokens  # sandwich norms; q/k norms; SDPA; SwiGLU
    kept += width * tokens * 4 * cond  # the scaled norms and the gates' other operands
    attention, ff = f"{prefix}.attention", f"{prefix}.feed_forward"
    kept += width * tokens * modulated * _adapted(query, *(f"{attention}.to_{x}" for x in "qkv"))  # scaled norm
    kept += width * tokens * _adapted(query, f"{attention}.to_out.0")
    kept += width * tokens * modulated * _adapted(query, f"{ff}.w1", f"{ff}.w3")
    kept += hidden * tokens * _adapted(query, f"{ff}.w2")
    inside = [name for name in query.adapted if name.startswith(prefix + ".")]
    kept += sum(_layer_ranks(query, name, 1 if ".adaLN_modulation." in name else tokens) for name in inside)
    return _block_stage(query, prefix, kept, width * tokens)


def _blocks_of(*groups: str):
    def blocks(layers: Shapes) -> list[str]:
        return [block for group in groups for block in _indexed(layers, group)]

    return blocks


def _image_vae_encode(layers: Shapes, pixels: int, frames: int) -> float:
    """Qwen-Image's causal video VAE encoding an image as one frame: 16 full-resolution maps of the first width
    (measured: RSS growth of diffusers' AutoencoderKLQwenImage at the release's size, float32 on the CPU, 15.8
    maps at 256 px and 13.5 at 512 px; a rough estimate, not measured on a GPU)."""
    return 3 * pixels + 16 * layers["encoder.conv_in"][0] * pixels


def _hunyuan_vae_encode(layers: Shapes, pixels: int, frames: int) -> float:
    """HunyuanVideo's causal 3D VAE encodes a whole clip at once (no frame cache): 7 maps of the first width per
    frame (measured: RSS growth of diffusers' AutoencoderKLHunyuanVideo at the release's size, float32 on the
    CPU, 6.6-7.1 maps per frame at 128-192 px and 9-17 frames; a rough estimate, not measured on a GPU)."""
    return (3 + 7 * layers["encoder.conv_in.conv"][0]) * pixels * frames


# Latent factor 16: an 8x VAE and 2x2 patches.
LLM_DIT_MODELS: dict[str, ActivationModel] = {
    "z-image": ActivationModel(
        z_image_activations, text_encoder_activations, vae_encode_elements,
        _blocks_of("noise_refiner", "context_refiner", "layers"), 16,
    ),
    "flux2": ActivationModel(
        flux2_activations, text_encoder_activations, vae_encode_elements,
        _blocks_of("transformer_blocks", "single_transformer_blocks"), 16,
    ),
    "hunyuan-video": ActivationModel(
        hunyuan_video_activations, text_encoder_activations, _hunyuan_vae_encode,
        _blocks_of("transformer_blocks", "single_transformer_blocks"), 16, temporal_factor=4,
    ),
    "longcat-image": ActivationModel(  # Flux's blocks and names (no pooled or guidance embedders)
        flux_activations, text_encoder_activations, vae_encode_elements, flux_blocks, 16
    ),
    "qwen-image": ActivationModel(
        qwen_image_activations, text_encoder_activations, _image_vae_encode, _blocks_of("transformer_blocks"), 16
    ),
}  # fmt: skip
