"""Put an adapter file into a loaded base: rebuild its per-module ranks/alphas, inject matching layers and load
the weights exactly."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from lora_cli.adapters.catalog import ModuleCatalog
from lora_cli.adapters.files import AdapterFile, read_adapter
from lora_cli.adapters.injection import InjectedAdapter, inject_spec
from lora_cli.adapters.keys import AdapterTensors
from lora_cli.adapters.registry import AdapterAlgorithm, AdapterSpec

if TYPE_CHECKING:
    from lora_cli.models.base import Architecture


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


def inject_adapter_file(components: dict[str, nn.Module], file: AdapterFile, name: str = "default") -> InjectedAdapter:
    """Inject an adapter file (read against these components) as adapter `name`, frozen, for inference."""
    spec = spec_from_tensors(file.algorithm, file.tensors)
    targets: dict[str, list[str]] = {}
    for component, module in file.tensors:
        targets.setdefault(component, []).append(module)
    adapter = inject_spec(components, spec, targets, seed=0, name=name)
    adapter.load_tensors(file.tensors, str(file.path))
    for model in adapter.components.values():
        model.requires_grad_(False)
    return adapter


def load_adapter_file(
    components: dict[str, nn.Module], architecture: Architecture, path: str | Path, name: str = "default"
) -> InjectedAdapter:
    """Read an adapter file (any layout) against loaded components and inject it as adapter `name`."""
    file = read_adapter(path, ModuleCatalog.from_components(architecture, components))
    return inject_adapter_file(components, file, name)
