"""HunyuanVideo adapters in Tencent's module names (musubi-tuner, diffusion-pipe, ComfyUI) as diffusers' module
names. diffusers' own converter does the renaming but (0.42) mis-handles some layers: it splits the single
blocks' fused `linear1` at width 3072 only, chunks the token refiner's fused q/k/v `lora_A` as well as `lora_B`,
swaps the final modulation's halves in `lora_A` too, reads no musubi stems or alphas, and skips files without an
`img_attn_qkv` layer. Those layers are converted here, the rest by diffusers."""

from __future__ import annotations

import re

import torch

# musubi-tuner's stems: `lora_unet_` + the original path with `_` for `.`; these tails hold underscores themselves.
ORIGINAL_TAILS = {
    "img_attn_qkv": "img_attn_qkv", "img_attn_proj": "img_attn_proj", "img_mlp_fc1": "img_mlp.fc1",
    "img_mlp_fc2": "img_mlp.fc2", "img_mod_linear": "img_mod.linear", "txt_attn_qkv": "txt_attn_qkv",
    "txt_attn_proj": "txt_attn_proj", "txt_mlp_fc1": "txt_mlp.fc1", "txt_mlp_fc2": "txt_mlp.fc2",
    "txt_mod_linear": "txt_mod.linear", "linear1": "linear1", "linear2": "linear2",
    "modulation_linear": "modulation.linear",
}  # fmt: skip
MUSUBI = re.compile(
    r"^lora_unet_(double_blocks|single_blocks)_(\d+)_([a-z0-9_]+)\.(lora_down|lora_up|alpha)(\.weight)?$"
)
PREFIX = r"^(?:transformer\.|diffusion_model\.)?"
LINEAR1 = re.compile(PREFIX + r"single_blocks\.(\d+)\.linear1\.(lora_A|lora_B)\.weight$")
REFINER_QKV = re.compile(
    PREFIX + r"txt_in\.individual_token_refiner\.blocks\.(\d+)\.self_attn_qkv\.(lora_A|lora_B)\.weight$"
)
FINAL_MODULATION = re.compile(PREFIX + r"final_layer\.adaLN_modulation\.1\.(lora_A|lora_B)\.weight$")
DIFFUSERS_NAMES = (
    "transformer_blocks.", "single_transformer_blocks.", "context_embedder.", "time_text_embed.", "x_embedder.",
    "norm_out.", "proj_out.",
)  # fmt: skip


def original_to_diffusers(flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any original-name layout as diffusers' `transformer.<module>.lora_A/B.weight` keys (alphas folded)."""
    from diffusers.loaders.lora_conversion_utils import _convert_hunyuan_video_lora_to_diffusers

    split = _split_fused(_alphas_folded({_dotted(key): value for key, value in flat.items()}))
    done = {key: value for key, value in split.items() if key.startswith("transformer.") and _diffusers_named(key)}
    rest = {key: value for key, value in split.items() if key not in done}
    return {**done, **(_convert_hunyuan_video_lora_to_diffusers(rest) if rest else {})}


def _diffusers_named(key: str) -> bool:
    return key.removeprefix("transformer.").startswith(DIFFUSERS_NAMES)


def _dotted(key: str) -> str:
    """musubi-tuner's `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight` as `diffusion_model.
    double_blocks.0.img_attn_qkv.lora_down.weight` (other keys unchanged)."""
    found = MUSUBI.match(key)
    if found is None:
        return key
    blocks, index, tail, factor, weight = found.groups()
    return f"diffusion_model.{blocks}.{index}.{ORIGINAL_TAILS.get(tail, tail)}.{factor}{weight or ''}"


def _alphas_folded(flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Factors named lora_A/lora_B, each layer's alpha / rank folded into lora_B and the alphas dropped (diffusers'
    converter for this pipeline reads no alphas)."""
    folded: dict[str, torch.Tensor] = {}
    for key, value in flat.items():
        if key.endswith(".alpha"):
            continue
        key = key.replace(".lora_down.weight", ".lora_A.weight").replace(".lora_up.weight", ".lora_B.weight")
        layer = key.split(".lora_")[0]
        alpha = flat.get(f"{layer}.alpha")
        if key.endswith(".lora_B.weight") and alpha is not None:
            value = value * (float(alpha) / value.shape[1])
        folded[key] = value
    return folded


def _split_fused(flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The layers diffusers' converter gets wrong, in diffusers' modules: `linear1` (q, k, v, MLP-in: 7 widths of
    rows) split at the file's own width and the refiner's `self_attn_qkv` in three, lora_A shared and lora_B's
    rows split; the final modulation's (shift, scale) rows of lora_B swapped into norm_out's (scale, shift)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in flat.items():
        if found := FINAL_MODULATION.match(key):
            if found.group(1) == "lora_B":
                shift, scale = value.chunk(2, dim=0)
                value = torch.cat([scale, shift], dim=0)
            out[f"transformer.norm_out.linear.{found.group(1)}.weight"] = value
            continue
        if found := LINEAR1.match(key):
            prefix = f"transformer.single_transformer_blocks.{found.group(1)}"
            names, width = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), value.shape[0] // 7
            sizes = (width, width, width, 4 * width)
        elif found := REFINER_QKV.match(key):
            prefix = f"transformer.context_embedder.token_refiner.refiner_blocks.{found.group(1)}"
            names, sizes = ("attn.to_q", "attn.to_k", "attn.to_v"), (value.shape[0] // 3,) * 3
        else:
            out[key] = value
            continue
        factor = found.group(2)
        parts = [value] * len(names) if factor == "lora_A" else torch.split(value, sizes, dim=0)
        for name, part in zip(names, parts, strict=True):
            out[f"{prefix}.{name}.{factor}.weight"] = part
    return out
