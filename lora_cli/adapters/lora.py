"""LoRA (Hu et al. 2021, arXiv:2106.09685) and LoCon (LoRA on convolutions too) through peft's LoRA layers:
W' = W + (alpha / r) * up @ down; with DoRA (Liu et al. 2024, arXiv:2402.09353) the result is renormalised
per output channel and scaled by a learned magnitude."""

from __future__ import annotations

from typing import Any

from lora_cli.adapters.registry import (
    AdapterAlgorithm,
    AdapterSpec,
    Named,
    common_peft_kwargs,
    exact_pattern,
    register,
)


def lora_config(spec: AdapterSpec, target_modules: list[str]) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        **common_peft_kwargs(spec, target_modules),
        lora_alpha=spec.alpha,
        alpha_pattern=exact_pattern(spec.alpha_pattern),
        lora_dropout=spec.dropout,
        use_dora=spec.dora,
        init_lora_weights=True,
    )


def _dora_scale_to_file(named: Named, alpha: float, rank: int) -> Named:
    if "dora_scale" not in named:
        return named
    # LyCORIS/ComfyUI store the magnitude per output channel as (out, 1) or (out, 1, 1, 1).
    dims = named["lora_down.weight"].dim()
    return {**named, "dora_scale": named["dora_scale"].reshape(-1, *[1] * (dims - 1))}


LORA_TENSORS = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora_magnitude_vector": "dora_scale",
}

# One file format: files read as lora. LoCon is LoRA that also adapts convolutions by default.
for _name, _marker, _targets in (("lora", "lora_down.weight", "attention"), ("locon", None, "full")):
    register(
        AdapterAlgorithm(
            name=_name,
            peft_config=lora_config,
            tensor_names=LORA_TENSORS,
            marker=_marker,
            rank_from_file=lambda named: int(named["lora_down.weight"].shape[0]),
            complete=lambda names: {"lora_down.weight", "lora_up.weight"} <= names,
            to_file=_dora_scale_to_file,
            formats=("kohya", "diffusers", "original"),
            dora=True,
            dropout=True,
            quantized_base=True,
            default_targets=_targets,
            full_delta=False,  # x @ down @ up: only a rank-r intermediate
            kohya_network_module="networks.lora",
        )
    )
