"""LoHa (FedPara, Hyeon-Woo et al. 2022, arXiv:2108.06098; LyCORIS) through peft's LoHa layers:
W' = W + (alpha / r) * (w1a @ w1b) * (w2a @ w2b), convolutions flattened to (out, in * kh * kw)."""

from __future__ import annotations

from typing import Any

from lora_cli.adapters.registry import AdapterAlgorithm, AdapterSpec, common_peft_kwargs, exact_pattern, register


def loha_config(spec: AdapterSpec, target_modules: list[str]) -> Any:
    from peft import LoHaConfig

    return LoHaConfig(
        **common_peft_kwargs(spec, target_modules),
        alpha=spec.alpha,
        alpha_pattern=exact_pattern(spec.alpha_pattern),
        use_effective_conv2d=False,
        init_weights=True,
    )


LOHA = register(
    AdapterAlgorithm(
        name="loha",
        peft_config=loha_config,
        tensor_names={name: name for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")},
        marker="hada_w1_a",
        rank_from_file=lambda named: int(named["hada_w1_a"].shape[1]),
        complete=lambda names: {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= names,
    )
)
