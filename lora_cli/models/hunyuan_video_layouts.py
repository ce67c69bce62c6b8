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


# Export: diffusers' modules -> Tencent's (fused) module names, which ComfyUI reads for HunyuanVideo.
FUSED = (  # (pattern of the member modules, the original module, its members in row order)
    (r"transformer_blocks\.(\d+)\.attn\.(to_q|to_k|to_v)", "double_blocks.{}.img_attn_qkv", ("to_q", "to_k", "to_v")),
    (r"transformer_blocks\.(\d+)\.attn\.(add_q_proj|add_k_proj|add_v_proj)", "double_blocks.{}.txt_attn_qkv",
     ("add_q_proj", "add_k_proj", "add_v_proj")),
    (r"single_transformer_blocks\.(\d+)\.(?:attn\.)?(to_q|to_k|to_v|proj_mlp)", "single_blocks.{}.linear1",
     ("to_q", "to_k", "to_v", "proj_mlp")),
)  # fmt: skip
RENAMED = (
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0", "double_blocks.{}.img_attn_proj"),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out", "double_blocks.{}.txt_attn_proj"),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj", "double_blocks.{}.img_mlp.fc1"),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2", "double_blocks.{}.img_mlp.fc2"),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj", "double_blocks.{}.txt_mlp.fc1"),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.2", "double_blocks.{}.txt_mlp.fc2"),
    (r"transformer_blocks\.(\d+)\.norm1\.linear", "double_blocks.{}.img_mod.linear"),
    (r"transformer_blocks\.(\d+)\.norm1_context\.linear", "double_blocks.{}.txt_mod.linear"),
    (r"single_transformer_blocks\.(\d+)\.proj_out", "single_blocks.{}.linear2"),
    (r"single_transformer_blocks\.(\d+)\.norm\.linear", "single_blocks.{}.modulation.linear"),
)
MLP_RATIO = 4  # HunyuanVideo's single blocks: linear1 = q, k, v (a width each) and the MLP input (4 widths)


def diffusers_to_original(tensors: dict[tuple[str, str], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A LoRA on diffusers' modules in Tencent's names (`diffusion_model.double_blocks.0.img_attn_qkv.lora_A
    .weight`): a fused module's down factors stacked (alpha / rank folded in) and its up factors block-diagonal,
    so its update is exactly its members' updates side by side (its rank is theirs summed); a member without an
    adapter is a zero block. Refuses what the names cannot hold (DoRA magnitudes, modules outside the blocks)."""
    from lora_cli.errors import AdapterError

    fused: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    members: dict[str, tuple[str, ...]] = {}
    plain: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for (component, module), named in tensors.items():
        if "dora_scale" in named or component != "transformer":
            raise AdapterError(f"the original layout holds LoRA on the transformer only, not {component}.{module}")
        down = named["lora_down.weight"] * (float(named["alpha"]) / named["lora_down.weight"].shape[0])
        factors = (down, named["lora_up.weight"])
        group = next(((p, t, m) for p, t, m in FUSED if re.fullmatch(p, module)), None)
        if group:
            found = re.fullmatch(group[0], module)
            name = group[1].format(found.group(1))
            fused.setdefault(name, {})[found.group(2)] = factors
            members[name] = group[2]
            continue
        renamed = next((t.format(f.group(1)) for p, t in RENAMED if (f := re.fullmatch(p, module))), None)
        if renamed is None:
            raise AdapterError(
                f"the original layout names HunyuanVideo's double and single blocks only, not {module}; train with "
                "adapter.targets attention or attention_ff"
            )
        plain[renamed] = factors
    for name, present in fused.items():
        width = next(up.shape[0] // (MLP_RATIO if m == "proj_mlp" else 1) for m, (_, up) in present.items())
        rows = {member: MLP_RATIO * width if member == "proj_mlp" else width for member in members[name]}
        downs = [present[m][0] for m in members[name] if m in present]
        ups = [present[m][1] if m in present else torch.zeros(rows[m], 0) for m in members[name]]
        plain[name] = (torch.cat(downs), torch.block_diag(*ups))
    flat = {}
    for name, (down, up) in plain.items():
        flat[f"diffusion_model.{name}.lora_A.weight"] = down.contiguous()
        flat[f"diffusion_model.{name}.lora_B.weight"] = up.contiguous()
    return flat
