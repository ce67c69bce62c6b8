"""Switch adapters on one loaded base without touching its weights (TGI Multi-LoRA style).

Every adapter is injected once as its own peft adapter beside the frozen layers; switching only changes
which adapters each layer runs and at what scale, which costs microseconds per layer. peft cannot hold
different algorithms on one layer, so a mix of algorithms uses the weight patcher instead.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from lora_cli.adapters.files import AdapterFile
from lora_cli.adapters.loading import inject_adapter_file
from lora_cli.sampling.patcher import WeightPatcher


class BypassSwitcher:
    """All adapters of one algorithm, injected side by side; `apply` picks the active ones and scales."""

    def __init__(self, components: dict[str, nn.Module]) -> None:
        self.components = components
        self.names: dict[Path, str] = {}
        self._layers: list[nn.Module] = []

    def add(self, file: AdapterFile) -> None:
        name = f"adapter{len(self.names)}"
        inject_adapter_file(self.components, file, name)
        self.names[file.path] = name
        self._layers = [m for c in self.components.values() for m in c.modules() if hasattr(m, "set_scale")]
        self.apply([])

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


def make_switcher(components: dict[str, nn.Module], files: list[AdapterFile]) -> BypassSwitcher | WeightPatcher:
    """Bypass switching when the adapters share one algorithm; weight patching for a mix, and for DoRA,
    whose strength means interpolating towards the DoRA weight (as in ComfyUI and lora-merge) rather than
    peft's scaling inside the norm. The files are added to the switcher."""
    switcher = BypassSwitcher(components) if uses_bypass(files) else WeightPatcher(components)
    for file in files:
        switcher.add(file)
    return switcher


def uses_bypass(files: list[AdapterFile]) -> bool:
    """Whether these adapters can be switched in bypass: one algorithm, no DoRA."""
    kinds = {_kind(file) for file in files}
    return len(kinds) <= 1 and "dora" not in kinds


def _kind(file: AdapterFile) -> str:
    return "dora" if any("dora_scale" in named for named in file.tensors.values()) else file.algorithm.name
