"""LoRA (Hu et al. 2021, arXiv:2106.09685) through peft's LoRA layers: W' = W + (alpha / r) * up @ down."""

from __future__ import annotations

from typing import Any

from lora_cli.adapters.registry import AdapterAlgorithm, register
from lora_cli.config.schema import AdapterSection


def lora_config(section: AdapterSection, target_modules: list[str]) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=section.rank,
        lora_alpha=section.effective_alpha,
        lora_dropout=section.dropout,
        target_modules=target_modules,
        init_lora_weights=True,
    )


LORA = register(
    AdapterAlgorithm(
        name="lora",
        peft_config=lora_config,
        tensor_names={"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"},
    )
)
