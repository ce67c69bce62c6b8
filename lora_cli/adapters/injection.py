"""Inject an adapter into a loaded base, and move its weights in and out of the internal key namespace."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from lora_cli.adapters.keys import AdapterTensors
from lora_cli.adapters.registry import AdapterAlgorithm, AdapterSpec, get_algorithm
from lora_cli.adapters.targets import keep_late_blocks, resolve_targets
from lora_cli.errors import AdapterError, PresetError
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


@contextmanager
def adapters_disabled(adapter: InjectedAdapter) -> Iterator[None]:
    """The base as if no adapter were injected (a distillation teacher), trainable flags untouched."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for c in adapter.components.values() for m in c.modules() if isinstance(m, BaseTunerLayer)]
    flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def spec_from_section(section: AdapterSection, shapes: dict[str, tuple[int, ...]]) -> AdapterSpec:
    """Training hyper-parameters for the target modules of `shapes` (module -> weight shape): the conv rank and
    alpha on Conv2d targets, and on layers too small for the rank, their largest usable rank (at the same
    alpha / rank scale, so the update's strength does not change)."""
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for module, shape in shapes.items():
        conv = len(shape) == 4
        rank = section.effective_conv_rank if conv else section.rank
        alpha = section.effective_conv_alpha if conv else section.effective_alpha
        usable = usable_rank(rank, shape)
        if usable != section.rank:
            rank_pattern[module] = usable
        if alpha * usable / rank != section.effective_alpha:
            alpha_pattern[module] = alpha * usable / rank
    return AdapterSpec(
        algorithm=section.type,
        rank=section.rank,
        alpha=section.effective_alpha,
        dropout=section.dropout,
        dora=section.dora,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )


def rank_notice(section: AdapterSection, spec: AdapterSpec) -> str | None:
    """One line for a rank larger than some target layers can use (they were given their usable rank)."""
    requested = {section.rank, section.effective_conv_rank}
    clamped = {module: rank for module, rank in spec.rank_pattern.items() if rank < min(requested)}
    if not clamped:
        return None
    return (
        f"adapter.rank {section.rank} is more than {len(clamped)} target layer(s) can use (e.g. "
        f"{next(iter(clamped))}); they train at their largest useful rank (at most {max(clamped.values())}) with the "
        "same alpha/rank scale"
    )


def usable_rank(rank: int, shape: tuple[int, ...]) -> int:
    """The largest rank an update of a weight of `shape` can use: its smaller side (a convolution's input side
    counts its kernel); a larger rank only adds parameters that can add nothing."""
    return max(1, min(rank, shape[0], math.prod(shape[1:])))


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
    if section.text_encoder and not architecture.trained_text_encoders:
        raise PresetError(
            f"adapter.text_encoder: {architecture.name}'s text encoder is a large language model that its LoRA "
            "loaders do not read (the community trains the transformer only); set it to false"
        )
    if section.text_encoder:
        for name in architecture.trained_text_encoders:
            te_patterns = section.text_encoder_targets or list(architecture.default_text_encoder_targets)
            plan[name] = resolve_targets(components[name], te_patterns, f"adapter.text_encoder_targets ({name})")
    return plan


def inject_adapter(base: LoadedBase, section: AdapterSection, seed: int) -> InjectedAdapter:
    """Wrap the targeted layers with adapter layers; only adapter weights are left trainable (float32)."""
    components = base.trainable_components()
    targets = plan_targets(base, section)
    shapes = {m: _weight_shape(components[c].get_submodule(m)) for c, names in targets.items() for m in names}
    return inject_spec(components, spec_from_section(section, shapes), targets, seed)


def _weight_shape(layer: nn.Module) -> tuple[int, ...]:
    """A target layer's logical weight shape (a quantized Linear stores its weight packed)."""
    if isinstance(layer, nn.Conv2d):
        return tuple(layer.weight.shape)
    return (layer.out_features, layer.in_features)


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
