"""Inject an adapter into a loaded base, and move its weights in and out of the internal key namespace."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lora_cli.adapters.registry import AdapterAlgorithm, get_algorithm
from lora_cli.adapters.targets import resolve_targets
from lora_cli.config.schema import AdapterSection
from lora_cli.errors import AdapterError
from lora_cli.io.keys import AdapterTensors
from lora_cli.models.base import LoadedBase


@dataclass
class InjectedAdapter:
    """An adapter living inside the base's components, by component name."""

    algorithm: AdapterAlgorithm
    section: AdapterSection
    components: dict[str, nn.Module]
    targets: dict[str, list[str]]

    def parameters(self, component: str) -> list[nn.Parameter]:
        return [p for p in self.components[component].parameters() if p.requires_grad]

    def trainable_count(self) -> int:
        return sum(p.numel() for name in self.components for p in self.parameters(name))

    def tensors(self) -> AdapterTensors:
        """The adapter's weights, per (component, module), with kohya/LyCORIS tensor names and `alpha`."""
        from peft import get_peft_model_state_dict

        result: AdapterTensors = {}
        alpha = torch.tensor(self.section.effective_alpha, dtype=torch.float32)
        for component, model in self.components.items():
            for key, value in get_peft_model_state_dict(model).items():
                module, file_name = _split_peft_key(key, self.algorithm)
                result.setdefault((component, module), {"alpha": alpha.clone()})[file_name] = value.detach().clone()
        return result

    def load_tensors(self, tensors: AdapterTensors, source: str) -> None:
        """Put weights from a file (same algorithm, same targets) into the injected layers, exactly."""
        from peft import set_peft_model_state_dict

        expected = {(c, m) for c, names in self.targets.items() for m in names}
        unknown = sorted(set(tensors) - expected)
        missing = sorted(expected - set(tensors))
        if unknown or missing:
            example = unknown[0] if unknown else missing[0]
            raise AdapterError(
                f"{source}: adapter layers do not match this preset's targets "
                f"({len(unknown)} unexpected, {len(missing)} missing, e.g. {'.'.join(example)})"
            )
        peft_names = {file: peft for peft, file in self.algorithm.tensor_names.items()}
        for component, model in self.components.items():
            state = {
                f"{module}.{peft_names[name]}": value
                for (comp, module), named in tensors.items()
                if comp == component
                for name, value in named.items()
                if name != "alpha"
            }
            result = set_peft_model_state_dict(model, state)
            if result.unexpected_keys:
                raise AdapterError(f"{source}: tensors that fit no layer, e.g. {result.unexpected_keys[0]}")


def inject_adapter(base: LoadedBase, section: AdapterSection, seed: int) -> InjectedAdapter:
    """Wrap the targeted layers with adapter layers; only adapter weights are left trainable (float32)."""
    from peft import inject_adapter_in_model

    algorithm = get_algorithm(section.type)
    architecture = base.architecture
    plan = {architecture.denoiser_name: section.targets or list(architecture.default_targets)}
    if section.text_encoder:
        for name in base.text_encoders:
            plan[name] = section.text_encoder_targets or list(architecture.default_text_encoder_targets)
    components = base.trainable_components()
    base_parameters = [p for model in components.values() for p in model.parameters()]
    targets: dict[str, list[str]] = {}
    torch.manual_seed(seed)  # adapter initialisation is part of the run's reproducibility
    for component, patterns in plan.items():
        model = components[component]
        where = "adapter.targets" if component == architecture.denoiser_name else "adapter.text_encoder_targets"
        targets[component] = resolve_targets(model, patterns, f"{where} ({component})")
        inject_adapter_in_model(algorithm.peft_config(section, targets[component]), model)
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    adapter = InjectedAdapter(algorithm, section, {c: components[c] for c in plan}, targets)
    if adapter.trainable_count() == 0:
        raise AdapterError("adapter: no trainable parameters were created; check adapter.targets")
    if any(p.requires_grad for p in base_parameters):
        raise RuntimeError("adapter injection left base weights trainable")  # a bug, never user input
    return adapter


def _split_peft_key(key: str, algorithm: AdapterAlgorithm) -> tuple[str, str]:
    for peft_name, file_name in algorithm.tensor_names.items():
        if key.endswith("." + peft_name):
            return key[: -len(peft_name) - 1], file_name
    raise AdapterError(f"unexpected adapter tensor {key} for algorithm {algorithm.name}")
