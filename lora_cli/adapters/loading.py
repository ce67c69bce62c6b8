"""Put an adapter file into a loaded base: detect its algorithm, rebuild its per-module ranks/alphas,
inject matching layers and load the weights exactly."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from torch import nn

from lora_cli.adapters.injection import InjectedAdapter, inject_spec
from lora_cli.adapters.registry import AdapterAlgorithm, AdapterSpec
from lora_cli.adapters.targets import adaptable_module_names
from lora_cli.io.adapter_file import read_adapter
from lora_cli.io.keys import AdapterTensors, KohyaTable, kohya_module_index


def spec_from_tensors(algorithm: AdapterAlgorithm, tensors: AdapterTensors) -> AdapterSpec:
    """Ranks and alphas per module as the file states them (the most common as default, others as patterns)."""
    ranks = {module: algorithm.rank_from_file(named) for (_, module), named in tensors.items()}
    alphas = {module: float(named.get("alpha", ranks[module])) for (_, module), named in tensors.items()}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return AdapterSpec(
        algorithm=algorithm.name,
        rank=rank,
        alpha=alpha,
        dora=any("dora_scale" in named for named in tensors.values()),
        rank_pattern={m: r for m, r in ranks.items() if r != rank},
        alpha_pattern={m: a for m, a in alphas.items() if a != alpha},
    )


def load_adapter_file(
    components: dict[str, nn.Module], table: KohyaTable, path: str | Path, name: str = "default"
) -> InjectedAdapter:
    """Inject the file's adapter into `components` as adapter `name` (frozen, for inference) and return it."""
    index = kohya_module_index({c: adaptable_module_names(m) for c, m in components.items()}, table)
    algorithm, tensors, _ = read_adapter(path, index)
    spec = spec_from_tensors(algorithm, tensors)
    targets: dict[str, list[str]] = {}
    for component, module in tensors:
        targets.setdefault(component, []).append(module)
    adapter = inject_spec(components, spec, targets, seed=0, name=name)
    adapter.load_tensors(tensors, str(path))
    for model in adapter.components.values():
        model.requires_grad_(False)
    return adapter
