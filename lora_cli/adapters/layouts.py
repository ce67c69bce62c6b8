"""The key layouts adapter files come in, recognised from their keys and brought to one of two shapes:

- layers by kohya stem (`lora_unet_down_blocks_0_..._to_q`): kohya sd-scripts, A1111, LyCORIS, lora-cli's
  kohya files. A stem does not spell its module path unambiguously (`_` for `.`), so stems are matched against
  the stems of a base's modules.
- layers by (component, module path): diffusers' `load_lora_weights` layout (`unet.<module>.lora_A.weight`),
  the older diffusers training examples (attention-processor names, renamed with diffusers' own tables), peft
  state dicts (`base_model.model.<module>`) and ComfyUI/BFL files (`diffusion_model.<module>`).

Tensor names become kohya/LyCORIS ones (`lora_down.weight`, `lora_up.weight`, `alpha`, `dora_scale`, `hada_*`,
`lokr_*`). Layouts that rename or fuse modules in an architecture's own way (Flux's original block names,
Wan's) are converted with diffusers' converters by `lora_cli.adapters.files`, which knows the base.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import torch

from lora_cli.errors import AdapterError, printable

Named = dict[str, torch.Tensor]
DENOISER = "@denoiser"  # the component of layouts that name only the denoiser (ComfyUI's `diffusion_model.`)
UNKNOWN = "@component"  # peft state dicts: one component, whichever the module paths belong to

PEFT_TENSORS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
                "lora_magnitude_vector": "dora_scale", "alpha": "alpha"}  # fmt: skip
KOHYA_TENSORS = ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale")
FACTOR_PREFIXES = ("lora_down", "lora_up", "hada_", "lokr_")
LYCORIS_PREFIXES = ("hada_", "lokr_")
PEFT_PARAMETER = re.compile(r"\.lora_([AB])\.default\.")  # a module's peft parameter under adapter name "default"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # where diffusers' loader looks for rank/alpha


@dataclass
class ParsedAdapter:
    """An adapter file's layers before they meet a base."""

    layout: str
    stems: dict[str, Named] = field(default_factory=dict)
    paths: dict[tuple[str, str], Named] = field(default_factory=dict)

    def layer_count(self) -> int:
        return len(self.stems) + len(self.paths)


def parse_layout(flat: dict[str, torch.Tensor], metadata: dict[str, str], source: str) -> ParsedAdapter:
    """Recognise the layout of `flat` and group its tensors by layer."""
    keys = list(flat)
    if all(key.startswith("lora_") for key in keys):
        lycoris = any(key.partition(".")[2].startswith(LYCORIS_PREFIXES) for key in keys)
        return ParsedAdapter("lycoris" if lycoris else "kohya", stems=_by_stem(flat, source))
    if any(".lora.down." in key or "_lora.down." in key or ".lora_linear_layer." in key for key in keys):
        return _paths("diffusers (attention processors)", _renamed_old_diffusers(flat), metadata, source)
    if all(key.startswith("base_model.model.") for key in keys):
        renamed = {f"{UNKNOWN}.{key.removeprefix('base_model.model.')}": value for key, value in flat.items()}
        return _paths("peft", renamed, metadata, source)
    if all(PEFT_PARAMETER.search(key) for key in keys):  # DiffSynth-Studio: the denoiser's peft parameter names
        renamed = {UNKNOWN + "." + PEFT_PARAMETER.sub(r".lora_\1.", key): value for key, value in flat.items()}
        return _paths("diffsynth", renamed, metadata, source)
    if all(key.startswith("diffusion_model.") for key in keys):
        renamed = {f"{DENOISER}.{key.removeprefix('diffusion_model.')}": value for key, value in flat.items()}
        return _paths("comfyui", renamed, metadata, source)
    return _paths("diffusers", flat, metadata, source)


def _by_stem(flat: dict[str, torch.Tensor], source: str) -> dict[str, Named]:
    stems: dict[str, Named] = {}
    for key, value in flat.items():
        stem, _, name = key.partition(".")
        if not name:
            raise AdapterError(f"{source}: key {printable(key)} has no tensor name after the layer name")
        stems.setdefault(stem, {})[name] = value
    for stem, named in stems.items():
        check_factors(named, stem, source)
    return stems


def check_factors(named: Named, layer: str, source: str) -> None:
    """A layer's tensors must be of the kind their names say: factors are floating-point matrices (or
    convolution kernels), alpha one number, a DoRA magnitude a floating-point vector."""
    for name, value in named.items():
        if name == "alpha":
            wrong = value.numel() != 1 or value.dtype == torch.bool
            kind = "one number"
        elif name == "dora_scale":
            wrong = value.dim() == 0 or not value.is_floating_point()
            kind = "a floating-point vector"
        elif name.startswith(FACTOR_PREFIXES):
            wrong = value.dim() < 2 or not value.is_floating_point() or value.numel() == 0
            kind = "a floating-point matrix"
        else:
            continue
        if wrong:
            raise AdapterError(
                f"{source}: layer {printable(layer)}: {name} is {str(value.dtype).removeprefix('torch.')} of shape "
                f"{tuple(value.shape)}, not {kind}; the file is damaged or not an adapter"
            )


def _paths(layout: str, flat: dict[str, torch.Tensor], metadata: dict[str, str], source: str) -> ParsedAdapter:
    """Group `component.module.TENSOR` keys; alphas from `.alpha` keys, else the diffusers/peft config."""
    paths: dict[tuple[str, str], Named] = {}
    for key, value in flat.items():
        component, _, rest = key.partition(".")
        suffix = next((s for s in (*PEFT_TENSORS, *KOHYA_TENSORS) if rest.endswith("." + s)), None)
        if suffix is None or not component:
            raise AdapterError(
                f"{source}: unrecognised adapter key {printable(key)} (not a LoRA tensor of a known layout)"
            )
        name = PEFT_TENSORS.get(suffix, suffix)
        named = paths.setdefault((component, rest[: -len(suffix) - 1]), {})
        if name in named:
            raise AdapterError(f"{source}: layer {printable(component + '.' + rest)} has two {name} tensors")
        named[name] = value
    for (component, module), named in paths.items():
        check_factors(named, f"{component}.{module}", source)
    _restore_alphas(paths, _peft_config(metadata))
    return ParsedAdapter(layout, paths=paths)


def _renamed_old_diffusers(flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The layout of the diffusers training examples before peft: `…attn1.processor.to_q_lora.down.weight`,
    `…to_q.lora.down.weight` (UNet) and `…q_proj.lora_linear_layer.down.weight` (text encoder), renamed with
    diffusers' own conversion tables."""
    from diffusers.utils.state_dict_utils import (
        StateDictType,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    unet = {k: v for k, v in flat.items() if not k.startswith("text_encoder")}
    text = {k: v for k, v in flat.items() if k.startswith("text_encoder")}
    renamed = convert_unet_state_dict_to_peft({k.replace(".processor.", "."): v for k, v in unet.items()})
    if text:
        kind = StateDictType.DIFFUSERS_OLD if any("_lora." in k for k in text) else StateDictType.DIFFUSERS
        renamed.update(convert_state_dict_to_peft(text, original_type=kind))
    return renamed


def _peft_config(metadata: dict[str, str]) -> dict[str, object]:
    """diffusers' `lora_adapter_metadata` (peft LoraConfig fields prefixed `component.`), or a peft
    `adapter_config.json` given as metadata under `peft_config`."""
    for key in (DIFFUSERS_METADATA_KEY, "peft_config"):
        try:
            config = json.loads(metadata.get(key, "{}"))
        except json.JSONDecodeError:
            raise AdapterError(f"metadata `{key}` is not valid JSON") from None
        if config:
            return config if isinstance(config, dict) else {}
    return {}


def _restore_alphas(paths: dict[tuple[str, str], Named], config: dict[str, object]) -> None:
    """Alpha per layer: its own `.alpha` tensor, else the config's `alpha_pattern`/`lora_alpha`, else the rank
    (scale 1, what diffusers assumes without metadata)."""
    for (component, module), named in paths.items():
        if "alpha" in named or "lora_down.weight" not in named:
            continue
        rank = int(named["lora_down.weight"].shape[0])
        pattern = _setting(config, component, "alpha_pattern") or {}
        alpha = _pattern_value(pattern, module) if isinstance(pattern, dict) else None
        if alpha is None:
            alpha = _setting(config, component, "lora_alpha")
        named["alpha"] = torch.tensor(float(alpha if isinstance(alpha, (int, float)) else rank))


def _setting(config: dict[str, object], component: str, name: str) -> object:
    return config.get(f"{component}.{name}", config.get(name))


def _pattern_value(pattern: dict, module: str) -> object:
    """peft's alpha_pattern keys are module names or regex suffixes of them; exact names first."""
    import re

    if module in pattern:
        return pattern[module]
    for key, value in pattern.items():
        try:
            if re.search(rf"(^|\.){key}$", module):
                return value
        except re.error:
            continue
    return None
