"""Switch adapters on one loaded base without touching its weights (TGI Multi-LoRA style).

Every adapter is injected once as its own peft adapter beside the frozen layers; switching only changes
which adapters each layer runs and at what scale, which costs microseconds per layer. peft cannot hold
different algorithms on one layer, so a mix of algorithms uses the weight patcher instead.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from lora_cli.adapters.loading import load_adapter_file
from lora_cli.adapters.registry import detect_algorithm
from lora_cli.errors import AdapterError
from lora_cli.io.keys import KohyaTable
from lora_cli.io.safetensors_file import read_header
from lora_cli.sampling.patcher import AdapterFile, WeightPatcher


class BypassSwitcher:
    """All adapters of one algorithm, injected side by side; `apply` picks the active ones and scales."""

    def __init__(self, components: dict[str, nn.Module], table: KohyaTable) -> None:
        self.components = components
        self.table = table
        self.names: dict[Path, str] = {}
        self._layers: list[nn.Module] = []

    def read(self, path: str | Path) -> AdapterFile:
        name = f"adapter{len(self.names)}"
        adapter = load_adapter_file(self.components, self.table, path, name)
        self.names[Path(path)] = name
        self._layers = [m for c in self.components.values() for m in c.modules() if hasattr(m, "set_scale")]
        self.apply([])
        return AdapterFile(Path(path), adapter.algorithm.name, {})

    def apply(self, active: list[tuple[AdapterFile, float]]) -> None:
        chosen = [(self.names[file.path], scale) for file, scale in active if scale != 0]
        for layer in self._layers:
            present = [(name, scale) for name, scale in chosen if name in layer.scaling]
            # peft's own set_adapter/enable_adapters also toggle requires_grad on every weight, which costs
            # more than the switch itself; inference needs only the flags (peft 0.21 BaseTunerLayer fields).
            layer._disable_adapters = not present
            layer._active_adapter = [name for name, _ in present]
            for name, scale in present:
                layer.set_scale(name, scale)

    def restore(self) -> None:
        self.apply([])


def make_switcher(components: dict[str, nn.Module], table: KohyaTable, paths: list[Path]):
    """Bypass switching when the adapters share one algorithm; weight patching for a mix, and for DoRA,
    whose strength means interpolating towards the DoRA weight (as in ComfyUI and lora-merge) rather than
    peft's scaling inside the norm."""
    kinds = {_algorithm_of(path) for path in paths}
    if len(kinds) <= 1 and "dora" not in kinds:
        return BypassSwitcher(components, table)
    return WeightPatcher(components, table)


def _algorithm_of(path: Path) -> str:
    header = read_header(path, AdapterError)
    names = {key.split(".", 1)[1] for key in header if key != "__metadata__" and "." in key}
    if any(name == "dora_scale" or name.startswith("lora_magnitude_vector") for name in names):
        return "dora"
    if not any(key.startswith("lora_") for key in header):
        return "lora"  # the diffusers/peft layout holds LoRA only
    return detect_algorithm(names, str(path)).name
