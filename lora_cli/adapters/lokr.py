"""LoKr (Yeh et al. 2023, arXiv:2309.14859; LyCORIS) through peft's LoKr layers:
W' = W + (alpha / r) * kron(w1, w2), each factor full or a low-rank product (w1_a @ w1_b, w2_a @ w2_b)."""

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

TENSORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def lokr_config(spec: AdapterSpec, target_modules: list[str]) -> Any:
    from peft import LoKrConfig

    return LoKrConfig(
        **common_peft_kwargs(spec, target_modules),
        alpha=spec.alpha,
        alpha_pattern=exact_pattern(spec.alpha_pattern),
        use_effective_conv2d=False,
        decompose_both=False,
        init_weights=True,
    )


def _full_factors(named: Named) -> bool:
    return "lokr_w1_a" not in named and "lokr_w2_a" not in named


def lokr_to_file(named: Named, alpha: float, rank: int) -> Named:
    """LyCORIS and ComfyUI ignore alpha when both factors are full matrices (scale 1): fold peft's
    alpha / r into w2 there and record alpha = r, so every reader computes the same update."""
    if not _full_factors(named):
        return named
    import torch

    return {**named, "lokr_w2": named["lokr_w2"] * (alpha / rank), "alpha": torch.tensor(float(rank))}


def lokr_rank(named: Named) -> int:
    for factor in ("lokr_w2_a", "lokr_w1_a"):
        if factor in named:
            return int(named[factor].shape[1])
    return int(round(float(named["alpha"])))  # full factors: written with alpha = r (see lokr_to_file)


LOKR = register(
    AdapterAlgorithm(
        name="lokr",
        peft_config=lokr_config,
        tensor_names={name: name for name in TENSORS},
        marker="lokr_w1",
        rank_from_file=lokr_rank,
        complete=lambda names: all(
            f"lokr_{w}" in names or {f"lokr_{w}_a", f"lokr_{w}_b"} <= names for w in ("w1", "w2")
        ),
        to_file=lokr_to_file,
    )
)
