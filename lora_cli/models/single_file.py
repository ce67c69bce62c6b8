"""The single-file checkpoint layout of Stable Diffusion 1.x / 2.x / XL (the original "LDM" key names).

A single-file checkpoint holds every component under one key prefix each (`model.diffusion_model.` for the
UNet, `first_stage_model.` for the VAE, `cond_stage_model.` or `conditioner.embedders.N.` for the text
encoders) with module names of the original code base. This module maps each diffusers parameter to its
place in such a file and back, with the same rules in both directions, so a merge can stream a single
file tensor by tensor and a diffusers folder can be written out as a single file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from lora_cli.errors import ModelLoadError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
QKV = ("q_proj", "k_proj", "v_proj")
UNSUPPORTED = "single files of DiTs such as Flux or SD3 are not supported; give a diffusers folder or hub id"


@dataclass(frozen=True)
class Placement:
    """Where one diffusers parameter lives in a single file."""

    key: str
    part: int | None = None  # which third of a fused q/k/v tensor (OpenCLIP `in_proj_*`)
    transposed: bool = False  # OpenCLIP `text_projection` is stored as (in, out)
    conv: bool = False  # a 1x1 convolution in the file, a Linear layer in diffusers (VAE attention)


@dataclass(frozen=True)
class TextEncoderSlot:
    component: str
    prefix: str
    open_clip: bool  # OpenCLIP names (ViT-H/bigG) rather than Hugging Face CLIP names
    with_projection: bool = False  # diffusers uses CLIPTextModelWithProjection (module names under text_model.)


@dataclass(frozen=True)
class SingleFileLayout:
    family: str
    pipeline_class: str
    text_encoders: tuple[TextEncoderSlot, ...]

    def prefixes(self) -> dict[str, str]:
        return {
            "unet": UNET_PREFIX,
            "vae": VAE_PREFIX,
            **{slot.component: slot.prefix for slot in self.text_encoders},
        }


SD1 = SingleFileLayout(
    "sd1", "StableDiffusionPipeline", (TextEncoderSlot("text_encoder", "cond_stage_model.transformer.", False),)
)
SD2 = SingleFileLayout(
    "sd2", "StableDiffusionPipeline", (TextEncoderSlot("text_encoder", "cond_stage_model.model.", True),)
)
SDXL = SingleFileLayout(
    "sdxl",
    "StableDiffusionXLPipeline",
    (
        TextEncoderSlot("text_encoder", "conditioner.embedders.0.transformer.", False),
        TextEncoderSlot("text_encoder_2", "conditioner.embedders.1.model.", True, with_projection=True),
    ),
)
LAYOUTS = (SDXL, SD2, SD1)


def detect_layout(keys: Iterable[str], source: str) -> SingleFileLayout:
    """Which family a single file belongs to, from its key names."""
    keys = list(keys)
    unet = any(key.startswith(UNET_PREFIX + "input_blocks.") for key in keys)
    for layout in LAYOUTS if unet else ():
        if all(any(key.startswith(slot.prefix) for key in keys) for slot in layout.text_encoders):
            return layout
    raise ModelLoadError(f"{source}: not a Stable Diffusion 1.x/2.x/XL single-file checkpoint ({UNSUPPORTED})")


def layout_for_folder(pipeline_class: str, text_encoder_config: dict) -> SingleFileLayout:
    """The single-file family a diffusers folder converts to (SD2's OpenCLIP encoder uses plain GELU)."""
    if pipeline_class == SDXL.pipeline_class:
        return SDXL
    if pipeline_class != SD1.pipeline_class:
        raise ModelLoadError(f"a {pipeline_class} has no single-file layout this tool can write")
    return SD2 if text_encoder_config.get("hidden_act") == "gelu" else SD1


def to_single_file(layout: SingleFileLayout, component: str, keys: list[str]) -> dict[str, Placement]:
    """`{diffusers_key: Placement}` for one component's parameters; a key with no place is an error."""
    buffers = ("position_ids",)  # saved by older transformers; not weights, and no single file holds them
    local = {_without_text_model(component, key): key for key in keys if not key.endswith(buffers)}
    rules = _rules(layout, component, list(local), diffusers_side=True)
    placed = {}
    for key, original in local.items():
        found = rules.lookup(key)
        if found is None:
            raise ModelLoadError(
                f"{component}: parameter {original} has no place in a {layout.family} single-file checkpoint"
            )
        placed[original] = found
    return placed


def _without_text_model(component: str, key: str) -> str:
    """Text encoders are mapped without transformers' optional `text_model.` level."""
    return key.removeprefix("text_model.") if component.startswith("text_encoder") else key


def from_single_file(layout: SingleFileLayout, keys: list[str]) -> dict[str, list[tuple[str, str, Placement]]]:
    """`{file_key: [(component, diffusers_key, placement)]}` for every key of a single file that holds a
    diffusers parameter (a fused q/k/v tensor holds three); other keys (EMA copies, buffers) are left out."""
    found: dict[str, list[tuple[str, str, Placement]]] = {}
    for component, prefix in layout.prefixes().items():
        local = [key[len(prefix) :] for key in keys if key.startswith(prefix)]
        rules = _rules(layout, component, local, diffusers_side=False)
        level = _text_model_level(layout, component)
        for diffusers_key, placement in rules.inverse(local):
            full = Placement(prefix + placement.key, placement.part, placement.transposed, placement.conv)
            name = diffusers_key if diffusers_key.startswith("text_projection") else level + diffusers_key
            found.setdefault(full.key, []).append((component, name, full))
    return found


def _text_model_level(layout: SingleFileLayout, component: str) -> str:
    slot = next((slot for slot in layout.text_encoders if slot.component == component), None)
    return "text_model." if slot is not None and slot.with_projection else ""


class _Rules:
    """Exact-key rules and module-prefix rules, diffusers name -> file name (without the component prefix)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.exact: dict[str, Placement] = {}
        self.prefixes: dict[str, tuple[str, bool]] = {}
        self.legacy: set[str] = set()  # old diffusers names: read from folders, never produced from files

    def add(self, diffusers: str, original: str, conv: bool = False, legacy: bool = False) -> None:
        self.prefixes[diffusers + "."] = (original + ".", conv)
        if legacy:
            self.legacy.add(diffusers + ".")

    def lookup(self, key: str) -> Placement | None:
        if key in self.exact:
            placement = self.exact[key]
            return Placement(self.prefix + placement.key, placement.part, placement.transposed, placement.conv)
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            head = ".".join(parts[:cut]) + "."
            if head in self.prefixes:
                original, conv = self.prefixes[head]
                return Placement(self.prefix + original + key[len(head) :], conv=conv)
        return None

    def inverse(self, file_keys: list[str]) -> list[tuple[str, Placement]]:
        by_file: dict[str, list[tuple[str, Placement]]] = {}
        for diffusers, placement in self.exact.items():
            by_file.setdefault(placement.key, []).append((diffusers, placement))
        back = {
            original: (diffusers, conv)
            for diffusers, (original, conv) in self.prefixes.items()
            if diffusers not in self.legacy
        }
        found = []
        for key in file_keys:
            if key in by_file:
                found += by_file[key]
                continue
            parts = key.split(".")
            for cut in range(len(parts) - 1, 0, -1):
                head = ".".join(parts[:cut]) + "."
                if head in back:
                    diffusers, conv = back[head]
                    found.append((diffusers + key[len(head) :], Placement(key, conv=conv)))
                    break
        return found


def _rules(layout: SingleFileLayout, component: str, keys: list[str], diffusers_side: bool) -> _Rules:
    if component == "unet":
        return _unet_rules(_unet_shape(keys, diffusers_side))
    if component == "vae":
        levels = _count(keys, "encoder.down_blocks." if diffusers_side else "encoder.down.")
        return _vae_rules(levels)
    slot = next(slot for slot in layout.text_encoders if slot.component == component)
    if not slot.open_clip:
        rules = _Rules(slot.prefix)
        for top in ("embeddings", "encoder", "final_layer_norm"):
            rules.add(top, "text_model." + top)
        return rules
    layers = _count(keys, "encoder.layers." if diffusers_side else "transformer.resblocks.")
    return _open_clip_rules(slot.prefix, layers)


@dataclass(frozen=True)
class _UNetShape:
    layers_per_block: int
    down_attention: tuple[bool, ...]
    up_attention: tuple[bool, ...]


def _unet_shape(keys: list[str], diffusers_side: bool) -> _UNetShape:
    if diffusers_side:
        levels = _count(keys, "down_blocks.")
        return _UNetShape(
            _count(keys, "down_blocks.0.resnets."),
            tuple(_has(keys, f"down_blocks.{i}.attentions.") for i in range(levels)),
            tuple(_has(keys, f"up_blocks.{i}.attentions.") for i in range(levels)),
        )
    downsamplers = sorted({int(m.group(1)) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.", k))})
    step = downsamplers[0] if downsamplers else _count(keys, "input_blocks.")
    levels = len(downsamplers) + 1
    return _UNetShape(
        step - 1,
        tuple(_has(keys, f"input_blocks.{1 + i * step}.1.") for i in range(levels)),
        tuple(_has(keys, f"output_blocks.{i * step}.1.") for i in range(levels)),
    )


RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip


def _unet_rules(shape: _UNetShape) -> _Rules:
    rules = _Rules(UNET_PREFIX)
    for diffusers, original in (
        ("conv_in", "input_blocks.0.0"),
        ("time_embedding.linear_1", "time_embed.0"),
        ("time_embedding.linear_2", "time_embed.2"),
        ("add_embedding.linear_1", "label_emb.0.0"),
        ("add_embedding.linear_2", "label_emb.0.2"),
        ("conv_norm_out", "out.0"),
        ("conv_out", "out.2"),
        ("mid_block.attentions.0", "middle_block.1"),
    ):
        rules.add(diffusers, original)

    def resnet(diffusers: str, original: str) -> None:
        for name, renamed in RESNET.items():
            rules.add(f"{diffusers}.{name}", f"{original}.{renamed}")

    resnet("mid_block.resnets.0", "middle_block.0")
    resnet("mid_block.resnets.1", "middle_block.2")
    step = shape.layers_per_block + 1
    levels = len(shape.down_attention)
    for level in range(levels):
        for layer in range(shape.layers_per_block):
            index = 1 + level * step + layer
            resnet(f"down_blocks.{level}.resnets.{layer}", f"input_blocks.{index}.0")
            rules.add(f"down_blocks.{level}.attentions.{layer}", f"input_blocks.{index}.1")
        if level < levels - 1:
            rules.add(f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{(level + 1) * step}.0.op")
        for layer in range(step):
            index = level * step + layer
            resnet(f"up_blocks.{level}.resnets.{layer}", f"output_blocks.{index}.0")
            rules.add(f"up_blocks.{level}.attentions.{layer}", f"output_blocks.{index}.1")
        if level < levels - 1:
            slot = 2 if shape.up_attention[level] else 1
            rules.add(f"up_blocks.{level}.upsamplers.0.conv", f"output_blocks.{level * step + step - 1}.{slot}.conv")
    return rules


def _vae_rules(levels: int) -> _Rules:
    rules = _Rules(VAE_PREFIX)
    for part in ("encoder", "decoder"):
        rules.add(f"{part}.conv_in", f"{part}.conv_in")
        rules.add(f"{part}.conv_out", f"{part}.conv_out")
        rules.add(f"{part}.conv_norm_out", f"{part}.norm_out")
        for index, name in ((0, "block_1"), (1, "block_2")):
            _vae_resnet(rules, f"{part}.mid_block.resnets.{index}", f"{part}.mid.{name}")
        attention = f"{part}.mid_block.attentions.0"
        rules.add(f"{attention}.group_norm", f"{part}.mid.attn_1.norm")
        for diffusers, original in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            rules.add(f"{attention}.{diffusers}", f"{part}.mid.attn_1.{original}", conv=True)
        # Older diffusers VAE folders (e.g. SD1.5's on the hub) still use these names.
        for legacy, original in (("query", "q"), ("key", "k"), ("value", "v"), ("proj_attn", "proj_out")):
            rules.add(f"{attention}.{legacy}", f"{part}.mid.attn_1.{original}", conv=True, legacy=True)
        for level in range(levels):
            source, target = ("down", level) if part == "encoder" else ("up", levels - 1 - level)
            for layer in range(8):  # more than any VAE has; rules for absent layers are never used
                _vae_resnet(
                    rules, f"{part}.{source}_blocks.{level}.resnets.{layer}", f"{part}.{source}.{target}.block.{layer}"
                )
            sampler = "downsample" if part == "encoder" else "upsample"
            rules.add(f"{part}.{source}_blocks.{level}.{sampler}rs.0.conv", f"{part}.{source}.{target}.{sampler}.conv")
    rules.add("quant_conv", "quant_conv")
    rules.add("post_quant_conv", "post_quant_conv")
    return rules


def _vae_resnet(rules: _Rules, diffusers: str, original: str) -> None:
    for name in ("norm1", "conv1", "norm2", "conv2"):
        rules.add(f"{diffusers}.{name}", f"{original}.{name}")
    rules.add(f"{diffusers}.conv_shortcut", f"{original}.nin_shortcut")


def _open_clip_rules(prefix: str, layers: int) -> _Rules:
    rules = _Rules(prefix)
    rules.exact["embeddings.position_embedding.weight"] = Placement("positional_embedding")
    rules.exact["text_projection.weight"] = Placement("text_projection", transposed=True)
    rules.add("embeddings.token_embedding", "token_embedding")
    rules.add("final_layer_norm", "ln_final")
    for layer in range(layers):
        diffusers, original = f"encoder.layers.{layer}", f"transformer.resblocks.{layer}"
        for name, renamed in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                              ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj")):  # fmt: skip
            rules.add(f"{diffusers}.{name}", f"{original}.{renamed}")
        for part, projection in enumerate(QKV):
            for kind in ("weight", "bias"):
                rules.exact[f"{diffusers}.self_attn.{projection}.{kind}"] = Placement(
                    f"{original}.attn.in_proj_{kind}", part=part
                )
    return rules


def _count(keys: list[str], prefix: str) -> int:
    """1 + the largest integer that follows `prefix` in any key (0 when none does)."""
    numbers = [int(m.group(1)) for key in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", key))]
    return max(numbers, default=-1) + 1


def _has(keys: list[str], prefix: str) -> bool:
    return any(key.startswith(prefix) for key in keys)


def original_unet_modules(modules: list[str]) -> dict[str, str]:
    """`{original (LDM) module path: diffusers module path}` for UNet modules named as diffusers names them:
    the names kohya's SDXL LoRAs and ComfyUI's `diffusion_model.` files use for the same layers."""
    rules = _unet_rules(_unet_shape([module + ".weight" for module in modules], diffusers_side=True))
    found = {}
    for module in modules:
        placement = rules.lookup(module + ".weight")
        if placement is not None and placement.key.endswith(".weight"):
            found[placement.key[len(UNET_PREFIX) : -len(".weight")]] = module
    return found
