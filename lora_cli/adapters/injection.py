"""Inject an adapter into a loaded base, and move its weights in and out of the internal key namespace."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from lora_cli.adapters.keys import AdapterTensors
from lora_cli.adapters.registry import AdapterAlgorithm, AdapterSpec, get_algorithm
from lora_cli.adapters.targets import keep_late_blocks, resolve_targets
from lora_cli.errors import AdapterError
from lora_cli.sharded_tensors import shard_like

if TYPE_CHECKING:
    from lora_cli.config.schema import AdapterSection
    from lora_cli.models.base import LoadedBase


@dataclass
class InjectedAdapter:
    """An adapter living inside the base's components, by component name."""

    algorithm: AdapterAlgorithm
    spec: AdapterSpec
    components: dict[str, nn.Module]
    targets: dict[str, list[str]]
    name: str = "default"  # peft adapter name: several adapters can live in one model

    def parameters(self, component: str) -> list[nn.Parameter]:
        return [p for p in self.components[component].parameters() if p.requires_grad]

    def trainable_count(self) -> int:
        return sum(p.numel() for name in self.components for p in self.parameters(name))

    def tensors(self) -> AdapterTensors:
        """The adapter's weights per (component, module), with kohya/LyCORIS tensor names and `alpha`."""
        from peft import get_peft_model_state_dict

        result: AdapterTensors = {}
        for component, model in self.components.items():
            for key, value in get_peft_model_state_dict(model, adapter_name=self.name).items():
                module, file_name = _split_peft_key(key, self.algorithm)
                alpha = torch.tensor(self.spec.alpha_of(module), dtype=torch.float32)
                result.setdefault((component, module), {"alpha": alpha})[file_name] = value.detach().clone()
        return result

    def ranks(self) -> dict[tuple[str, str], int]:
        return {(c, m): self.spec.rank_of(m) for c, names in self.targets.items() for m in names}

    def load_tensors(self, tensors: AdapterTensors, source: str) -> None:
        """Put weights from a file or checkpoint into the injected layers, exactly (reshaped to each layer)."""
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

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
            own = get_peft_model_state_dict(model, adapter_name=self.name)
            state = {}
            for (comp, module), named in tensors.items():
                if comp != component:
                    continue
                for name, value in named.items():
                    if name == "alpha":
                        continue
                    key = f"{module}.{peft_names[name]}"
                    if key not in own or own[key].numel() != value.numel():
                        got = tuple(value.shape)
                        needs = tuple(own[key].shape) if key in own else None
                        raise AdapterError(
                            f"{source}: layer {module} does not fit this base ({name} is {got}, layer needs {needs})"
                        )
                    state[key] = shard_like(value.reshape(own[key].shape), own[key])
            result = set_peft_model_state_dict(model, state, adapter_name=self.name)
            if result.unexpected_keys:
                raise AdapterError(f"{source}: tensors that fit no layer, e.g. {result.unexpected_keys[0]}")


def spec_from_section(section: AdapterSection, conv_modules: list[str]) -> AdapterSpec:
    """Training hyper-parameters, with the conv rank/alpha applied to the Conv2d targets."""
    conv_rank, conv_alpha = section.effective_conv_rank, section.effective_conv_alpha
    return AdapterSpec(
        algorithm=section.type,
        rank=section.rank,
        alpha=section.effective_alpha,
        dropout=section.dropout,
        dora=section.dora,
        rank_pattern={m: conv_rank for m in conv_modules if conv_rank != section.rank},
        alpha_pattern={m: conv_alpha for m in conv_modules if conv_alpha != section.effective_alpha},
    )


def plan_targets(base: LoadedBase, section: AdapterSection) -> dict[str, list[str]]:
    """Full module names to adapt per component, from presets/patterns and `late`."""
    architecture = base.architecture
    components = base.trainable_components()
    denoiser = architecture.denoiser_name
    spec = section.target_spec
    patterns = architecture.target_presets[spec] if isinstance(spec, str) else spec
    names = resolve_targets(components[denoiser], patterns, f"adapter.targets ({denoiser})")
    if section.late:
        names = keep_late_blocks(names, architecture.blocks(components[denoiser]), section.late)
    plan = {denoiser: names}
    if section.text_encoder:
        for name in architecture.trained_text_encoders:
            te_patterns = section.text_encoder_targets or list(architecture.default_text_encoder_targets)
            plan[name] = resolve_targets(components[name], te_patterns, f"adapter.text_encoder_targets ({name})")
    return plan


def inject_adapter(base: LoadedBase, section: AdapterSection, seed: int) -> InjectedAdapter:
    """Wrap the targeted layers with adapter layers; only adapter weights are left trainable (float32)."""
    components = base.trainable_components()
    targets = plan_targets(base, section)
    conv = [m for c, names in targets.items() for m in names if isinstance(components[c].get_submodule(m), nn.Conv2d)]
    return inject_spec(components, spec_from_section(section, conv), targets, seed)


def inject_spec(
    components: dict[str, nn.Module],
    spec: AdapterSpec,
    targets: dict[str, list[str]],
    seed: int,
    name: str = "default",
) -> InjectedAdapter:
    """Inject `spec` as adapter `name` into the named modules of each component (any nn.Module)."""
    from peft import inject_adapter_in_model

    algorithm = get_algorithm(spec.algorithm)
    base_parameters = [p for c in targets for n, p in components[c].named_parameters() if not _is_adapter_parameter(n)]
    torch.manual_seed(seed)  # adapter initialisation is part of the run's reproducibility
    for component, names in targets.items():
        model = components[component]
        component_spec = replace(
            spec,
            rank_pattern={m: r for m, r in spec.rank_pattern.items() if m in names},
            alpha_pattern={m: a for m, a in spec.alpha_pattern.items() if m in names},
        )
        inject_adapter_in_model(algorithm.peft_config(component_spec, names), model, adapter_name=name)
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    adapter = InjectedAdapter(algorithm, spec, {c: components[c] for c in targets}, targets, name)
    if adapter.trainable_count() == 0:
        raise AdapterError("adapter: no trainable parameters were created; check adapter.targets")
    if any(p.requires_grad for p in base_parameters):
        raise RuntimeError("adapter injection left base weights trainable")  # a bug, never user input
    return adapter


def _is_adapter_parameter(name: str) -> bool:
    return any(f".{prefix}" in name for prefix in ("lora_", "hada_", "lokr_"))


def _split_peft_key(key: str, algorithm: AdapterAlgorithm) -> tuple[str, str]:
    for peft_name, file_name in algorithm.tensor_names.items():
        if key.endswith("." + peft_name):
            return key[: -len(peft_name) - 1], file_name
    raise AdapterError(f"unexpected adapter tensor {key} for algorithm {algorithm.name}")
