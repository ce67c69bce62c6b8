"""Peak device memory and system RAM of a training run, estimated from the preset and the base's headers.

A run goes through three phases, and each peak is the largest phase total:
- load: components stored in another dtype are converted into RAM (those in `model.dtype` stay memory-mapped
  until used); quantizing reads the full-precision denoiser once;
- cache: the encoders work on the device (adapter already injected) to fill the latent/text caches;
- train: the denoiser (and the encoders still held), adapter, gradients, optimizer state and activations.
On "cuda" the device holds cache and train; RAM holds what waits for the device or is offloaded, its peak while
loading, filling the caches, or when the denoiser moves to the GPU (`host_ram`). On "cpu" everything is RAM.
File pages read once (`Part.file_pages`) show in RSS but are not part of what must fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lora_cli.adapters.registry import get_algorithm
from lora_cli.config.schema import AdapterSection
from lora_cli.errors import ModelLoadError
from lora_cli.planning.activations import UNET_MODELS, ActivationModel, Activations, DenoiserQuery
from lora_cli.planning.adapter_size import adaptable_layers, adapter_tensor_sizes, match_targets, select_targets
from lora_cli.planning.host_ram import gpu_run_host_phases, streamed_blocks, streamed_encoders
from lora_cli.planning.inventory import TORCH_DTYPE_BYTES, BaseInventory
from lora_cli.planning.llm_dit_activations import LLM_DIT_MODELS
from lora_cli.planning.offload import HOST_LINK_GBPS, at_once, copy_note, offloaded_block_bytes
from lora_cli.planning.parts import Part, needed, resident
from lora_cli.planning.stored import StoredWeights
from lora_cli.planning.text_tokens import denoiser_text_tokens, encoder_tokens, text_encoders
from lora_cli.planning.transformer_activations import DIT_MODELS
from lora_cli.training.encoders import CACHE_BATCH

if TYPE_CHECKING:
    from lora_cli.config.schema import Preset
    from lora_cli.models.base import Architecture

ACTIVATION_MODELS: dict[str, ActivationModel] = UNET_MODELS | DIT_MODELS | LLM_DIT_MODELS  # by Architecture.name
DEVICES = ("cuda", "cpu")
MiB = 2**20

# Measured on this project's 2-core CPU machine (docs/memory-planner.md): RSS of Python, torch, diffusers,
# transformers, peft and accelerate with the trainer imported, plus first-step kernels and buffers.
CPU_RUNTIME = 465 * MiB
# glibc keeps freed blocks below its 32 MiB mmap threshold in the heap, so peak RSS over activations exceeds
# the live bytes. Both factors apply to the saved count *without* checkpointing: a checkpointed forward pass
# still allocates each block's full set before freeing it, and the heap keeps most of it (fitted on
# saved-tensor counts and RSS of SD1.5-shaped UNets at 256-512 px).
CPU_ACTIVATION_FACTOR = 1.65
CPU_CHECKPOINT_FACTOR = 1.05
# GPU figures: CUDA context and library workspaces on the device, the CUDA libraries in the process's RAM, and
# the caching allocator's fragmentation over live activations. The context is calibrated on the H200 peaks of
# ../shared/gpu-check (2026-11-30, nvidia-smi, torch 2.11+cu130): SD1.5 architecture 512 px batch 4 bf16
# measured 7,289 MiB where 1 GiB gave 6.1 GiB (-14%), the 1.2B Flux-shaped nf4 run 3,343 MiB where it gave
# 2.7 GiB (-17%); 1.4 GiB brings both within -9%.
CUDA_CONTEXT = 1434 * MiB
CUDA_RUNTIME_RAM = CPU_RUNTIME + 1536 * MiB
CUDA_ALLOCATOR_FACTOR = 1.15


@dataclass(frozen=True)
class PlanSettings:
    """The preset values memory depends on; `advise` proposes new values for these."""

    adapter: AdapterSection
    resolution: int = 512
    batch_size: int = 1
    gradient_accumulation: int = 1
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"
    dtype: str = "float32"
    quantize: str = "none"
    optimizer: str = "adamw"
    cache_latents: bool = False
    cache_text_embeddings: bool = False
    keep_encoders: bool = False  # previews need the VAE and text encoder after caching
    text_cache_allowed: bool = True  # not with a text-encoder adapter or tag shuffling
    images: int | None = None  # training images, when known: caching encodes up to CACHE_BATCH at once
    frames: int | None = None  # video clips of this many frames (`data.frames`), else images
    text_tokens: int | None = None  # `model.max_text_tokens`: a DiT's T5 token limit, else its default
    offload_blocks: int = 0  # `train.offload_blocks`: the last N of a DiT's blocks wait in pinned host memory
    offloadable_blocks: int = 0  # a DiT's repeated blocks (the advice may offload up to all of them; UNets: 0)
    host_link_gbps: float = HOST_LINK_GBPS  # host-to-GPU bandwidth for the offloaded blocks' copies, GB/s
    processes: int = 1  # processes training together; every figure is per process
    sharded: bool = False  # FSDP over `processes` (`distributed.strategy: fsdp`)
    reshard_after_forward: bool = True

    @classmethod
    def from_preset(cls, preset: Preset, images: int | None = None, processes: int = 1) -> PlanSettings:
        train = preset.train
        return cls(
            adapter=preset.adapter,
            resolution=preset.data.resolution,
            batch_size=train.batch_size,
            gradient_accumulation=train.gradient_accumulation,
            gradient_checkpointing=train.gradient_checkpointing,
            mixed_precision=train.mixed_precision,
            dtype=preset.model.dtype,
            quantize=preset.model.quantize,
            optimizer=train.optimizer,
            cache_latents=preset.cache.latents,
            cache_text_embeddings=preset.cache.text_embeddings,
            keep_encoders=bool(preset.sample.prompts),
            text_cache_allowed=not (preset.adapter.text_encoder or preset.data.shuffle_tags),
            images=images,
            frames=preset.data.frames,
            text_tokens=preset.model.max_text_tokens,
            offload_blocks=train.offload_blocks,
            processes=processes,
            sharded=preset.distributed.strategy == "fsdp" and processes > 1,
            reshard_after_forward=preset.distributed.reshard_after_forward,
        )


@dataclass(frozen=True)
class MemoryPlan:
    """Estimated peaks with the breakdown of the phase where each occurs."""

    device: str
    settings: PlanSettings
    peak_device_bytes: int
    peak_ram_bytes: int
    device_phase: str
    ram_phase: str
    device_parts: tuple[Part, ...]
    ram_parts: tuple[Part, ...]
    adapter_parameters: int
    adapted_layers: int
    notes: tuple[str, ...] = field(default=())
    offloaded_bytes: int = 0  # frozen weights kept in pinned host memory (`train.offload_blocks`)
    offloadable_blocks: int = 0  # a DiT's repeated blocks, which `train.offload_blocks` can take; a UNet's: 0
    peak_resident_bytes: int = 0  # RAM with the file pages read once: what the process's RSS may show


def estimate_memory(inventory: BaseInventory, settings: PlanSettings, device: str = "cuda") -> MemoryPlan:
    """The memory plan of training `settings` on `inventory`'s base on `device` ("cuda" or "cpu")."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    facts = _facts(inventory, settings)
    load = _load_phase(inventory, settings, facts, device)
    cache = _cache_phase(inventory, settings, facts, device)
    train = _train_phase(inventory, settings, facts, device)
    if device == "cuda":
        released = _released(inventory, settings, facts)
        host = gpu_run_host_phases(facts.weights, _host_runtime(device), released, facts.offloaded)
        ram_phases = {"load": load, **host}
    else:
        ram_phases = {"load": load, "cache": cache, "train": train}
    device_phases = {"cache": cache, "train": train} if device == "cuda" else ram_phases
    device_phase = _largest(device_phases)
    ram_phase = _largest(ram_phases)
    return MemoryPlan(
        device=device,
        settings=settings,
        peak_device_bytes=max(needed(parts) for parts in device_phases.values()),
        peak_ram_bytes=max(needed(parts) for parts in ram_phases.values()),
        device_phase=device_phase,
        ram_phase=ram_phase,
        device_parts=device_phases[device_phase],
        ram_parts=ram_phases[ram_phase],
        adapter_parameters=sum(facts.adapter_sizes),
        adapted_layers=facts.adapted_layers,
        notes=facts.notes,
        offloaded_bytes=sum(facts.offloaded) if device == "cuda" else 0,
        offloadable_blocks=len(facts.blocks) if facts.architecture.denoiser_name == "transformer" else 0,
        peak_resident_bytes=max(resident(parts) for parts in ram_phases.values()),
    )


@dataclass(frozen=True)
class _Facts:
    """What the phases share: the architecture's model, adapter tensors and activation counts."""

    architecture: Architecture
    model: ActivationModel
    weights: StoredWeights
    adapter_sizes: tuple[int, ...]
    denoiser_adapter: int  # elements of the denoiser's share of `adapter_sizes` (FSDP shards it)
    largest_block: int  # elements of the denoiser's largest block (FSDP gathers blocks whole)
    blocks: list[str]  # the denoiser's repeated blocks in execution order
    offloaded: tuple[int, ...]  # stored bytes of each offloaded block's frozen weights
    adapted_layers: int
    activations: Activations
    text_activations: float  # per sample, when the text encoder's adapter trains
    notes: tuple[str, ...]


def _facts(inventory: BaseInventory, settings: PlanSettings) -> _Facts:
    architecture = _architecture(inventory)
    model = ACTIVATION_MODELS[architecture.name]
    section = settings.adapter
    denoiser = architecture.denoiser_name
    stored = StoredWeights(inventory, settings, denoiser)
    layers = adaptable_layers(inventory.layer_shapes(denoiser))
    vectors = {w.name: w.shape for w in inventory.components[denoiser] if w.name.removesuffix(".weight") not in layers}
    targets = select_targets(layers, section, architecture.target_presets, model.blocks(layers), denoiser)
    sizes = [size for name in targets for size in adapter_tensor_sizes(section, layers[name])]
    denoiser_adapter = sum(sizes)
    blocks = model.blocks(layers)
    weights = inventory.components[denoiser]
    largest_block = max((sum(w.numel for w in weights if w.name.startswith(f"{b}.")) for b in blocks), default=0)
    linear = set(layers) if settings.quantize != "none" else set()
    offloaded = offloaded_block_bytes(
        weights, blocks, settings.offload_blocks, lambda w: stored.weight_bytes(w, linear, moved=True)
    )
    adapted = len(targets)
    query = DenoiserQuery(
        layers=layers,
        adapted=frozenset(targets),
        rank=section.rank,
        full_delta=get_algorithm(section.type).full_delta,
        dora=section.dora,
        latent_tokens=(settings.resolution // model.latent_factor) ** 2 * _latent_frames(settings, model),
        text_tokens=denoiser_text_tokens(inventory, architecture, model.clip_tokens, settings.text_tokens),
        vectors=vectors,
    )
    text_activations = 0.0
    if section.text_encoder:
        patterns = section.text_encoder_targets or list(architecture.default_text_encoder_targets)
        for component in [name for name in architecture.trained_text_encoders if name in inventory.components]:
            te_layers = adaptable_layers(inventory.layer_shapes(component))
            te_targets = match_targets(te_layers, patterns, f"adapter.text_encoder_targets ({component})")
            sizes += [size for name in te_targets for size in adapter_tensor_sizes(section, te_layers[name])]
            adapted += len(te_targets)
            tokens = encoder_tokens(inventory, component, architecture, settings.text_tokens)
            text_activations += model.text_encoder(te_layers, frozenset(te_targets), section.rank, tokens)
    notes = ("previews (inference and VAE decoding at sample time) are not counted",) if settings.keep_encoders else ()
    if settings.processes > 1:
        notes += (f"figures are per process: {settings.processes} processes on one machine need that RAM each",)
    if settings.offload_blocks:
        notes += (copy_note(offloaded, settings.host_link_gbps),)
    activations = model.denoiser(query)
    return _Facts(
        architecture,
        model,
        stored,
        tuple(sizes),
        denoiser_adapter,
        largest_block,
        blocks,
        offloaded,
        adapted,
        activations,
        text_activations,
        notes,
    )


def _load_phase(inventory: BaseInventory, settings: PlanSettings, facts: _Facts, device: str) -> tuple[Part, ...]:
    """Loading into RAM. A memory-mapped component is not resident until it is used; one stored in another dtype
    is converted into a copy in RAM. Quantizing reads the full-precision denoiser once, layer by layer: from a
    memory-mapped file, those are file pages; converted, a full copy."""
    parts = [_host_runtime(device)]
    denoiser = facts.architecture.denoiser_name
    on_the_move = device == "cuda" and settings.quantize == "int8"  # bitsandbytes quantizes it on the GPU
    for name in inventory.components:
        if not facts.weights.mapped(name) and not (on_the_move and name == denoiser):
            parts.append(Part(f"weights: {name}", facts.weights.component_bytes(name)))
    if settings.quantize != "none":
        full = facts.weights.component_bytes(denoiser, quantize=False)
        from_file = facts.weights.in_model_dtype(denoiser)
        parts.append(Part(f"full-precision {denoiser} while it is quantized", full, file_pages=from_file))
    return tuple(parts)


def _cache_phase(inventory: BaseInventory, settings: PlanSettings, facts: _Facts, device: str) -> tuple[Part, ...]:
    """Filling the caches: encoders at work beside the loaded denoiser and the injected adapter."""
    if not (settings.cache_latents or settings.cache_text_embeddings):
        return ()
    parts = [_runtime(device)]
    denoiser = facts.architecture.denoiser_name
    for name in inventory.components:
        if name == denoiser and (device == "cuda" or facts.weights.mapped(name)):
            continue  # it waits in RAM until training (and, memory-mapped on the CPU, is not read before)
        parts.append(_held_weights(settings, facts, name, device))
    parts.append(Part("adapter", 4 * sum(facts.adapter_sizes)))
    if settings.cache_latents:
        chunk = min(CACHE_BATCH, settings.images or CACHE_BATCH)
        encoding = chunk * _vae_elements(inventory, settings, facts) * TORCH_DTYPE_BYTES[settings.dtype]
        parts.append(Part(f"VAE encoding {chunk} images at once", round(encoding)))
    return tuple(parts)


def _released(inventory: BaseInventory, settings: PlanSettings, facts: _Facts) -> set[str]:
    """The encoders let go once the caches are full (previews keep them)."""
    released = set()
    if settings.cache_latents and not settings.keep_encoders:
        released.add("vae")
    if settings.cache_text_embeddings and settings.text_cache_allowed and not settings.keep_encoders:
        released |= set(text_encoders(inventory, facts.architecture))
    return released


def _train_phase(inventory: BaseInventory, settings: PlanSettings, facts: _Facts, device: str) -> tuple[Part, ...]:
    parts = [_runtime(device)]
    released = _released(inventory, settings, facts)
    for name in inventory.components:
        if settings.sharded and name == facts.architecture.denoiser_name:
            parts += _sharded_weights(inventory, settings, facts, name, device)
        elif facts.offloaded and name == facts.architecture.denoiser_name and device == "cuda":
            full = facts.weights.component_bytes(name, device)
            parts.append(Part(f"weights: {name} (without {len(facts.offloaded)} offloaded blocks)",
                              full - sum(facts.offloaded)))  # fmt: skip
            parts.append(Part("offloaded blocks on the GPU at once (2: running, prefetched)", at_once(facts.offloaded)))
        elif name not in released:
            parts.append(_held_weights(settings, facts, name, device))
    adapter = sum(facts.adapter_sizes)
    # FSDP splits the denoiser's adapter, its gradients and optimizer state; a text encoder's stays whole.
    share = (adapter - facts.denoiser_adapter * (1 - 1 / settings.processes)) / adapter if settings.sharded else 1
    optimizer = _optimizer_bytes(settings.optimizer, facts.adapter_sizes)
    parts += [
        Part("adapter (float32)", round(4 * adapter * share)),
        Part("gradients (float32)", round(4 * adapter * share)),
        Part(f"optimizer state ({settings.optimizer})", round(optimizer * share)),
    ]
    activations = _activation_bytes(settings, facts, device)
    mode = "gradient checkpointing" if settings.gradient_checkpointing else "no checkpointing"
    clip = f", {settings.frames} frames" if settings.frames else ""
    activation = Part(f"activations (batch {settings.batch_size}, {settings.resolution} px{clip}, {mode})", activations)
    if settings.cache_latents:
        return (*parts, activation)
    elements = _vae_elements(inventory, settings, facts) * settings.batch_size
    encoding = Part("VAE encoding the batch", round(elements * TORCH_DTYPE_BYTES[settings.dtype]))
    # The encoding runs before the denoiser. A GPU allocator reuses its memory; on the CPU its large maps
    # are fresh mmaps while the activations' heap, kept from the step before, stays resident.
    if device == "cpu":
        return (*parts, activation, encoding)
    return (*parts, max(activation, encoding, key=lambda part: part.bytes))


def _held_weights(settings: PlanSettings, facts: _Facts, name: str, device: str) -> Part:
    """A component's weights on the device; with block offloading on a GPU, a text encoder streams its blocks."""
    streams = settings.offload_blocks and device == "cuda" and name in streamed_encoders(facts.weights)
    found = streams and streamed_blocks(facts.weights, name)
    if not found:
        return Part(f"weights: {name}", facts.weights.component_bytes(name, device))
    resident, blocks, _host = found
    return Part(f"weights: {name} (blocks streamed, 2 of {blocks} at once)", resident)


def _sharded_weights(
    inventory: BaseInventory, settings: PlanSettings, facts: _Facts, name: str, device: str
) -> list[Part]:
    """FSDP: this process's shard, plus what is gathered at once: up to three blocks (computing, prefetching,
    copying out of the gather buffer), or every other shard by the end of the forward pass when gathered
    weights are kept for backward."""
    full = facts.weights.component_bytes(name, device)
    shard = full // settings.processes
    if settings.reshard_after_forward:
        blocks = min(3 * facts.largest_block * TORCH_DTYPE_BYTES[settings.dtype], full - shard)
        gathered = Part("weights gathered at once (3 blocks)", blocks)
    else:
        gathered = Part("weights gathered until backward (reshard_after_forward: false)", full - shard)
    return [Part(f"weights: {name} (1/{settings.processes} shard)", shard), gathered]


def _activation_bytes(settings: PlanSettings, facts: _Facts, device: str) -> int:
    counts = facts.activations
    if device == "cpu":  # RSS follows what the forward pass allocates, through glibc's kept heap
        factor = CPU_CHECKPOINT_FACTOR if settings.gradient_checkpointing else CPU_ACTIVATION_FACTOR
        per_sample, allocator = factor * counts.saved, 1.0
    else:
        per_sample, allocator = counts.peak(settings.gradient_checkpointing), CUDA_ALLOCATOR_FACTOR
    elements = (per_sample + facts.text_activations) * settings.batch_size
    return round((elements * _activation_dtype_bytes(settings) + 4 * counts.per_step) * allocator)


def _optimizer_bytes(optimizer: str, sizes: tuple[int, ...]) -> int:
    """AdamW: two float32 moments. AdamW8bit (bitsandbytes): two uint8 moments plus a float32 absmax per
    256 values for tensors of 4096+ elements, float32 moments below. Prodigy: moments, `s` and the initial
    copy `p0` (an upper bound: p0 is a scalar for zero-initialised tensors)."""
    if optimizer == "adamw":
        return 8 * sum(sizes)
    if optimizer == "adamw8bit":
        return sum(2 * n + 8 * math.ceil(n / 256) if n >= 4096 else 8 * n for n in sizes)
    if optimizer == "prodigy":
        return 16 * sum(sizes)
    raise ValueError(f"unknown optimizer {optimizer!r}")


def _vae_elements(inventory: BaseInventory, settings: PlanSettings, facts: _Facts) -> float:
    """Elements live while the VAE encodes one image (or clip) at the training resolution."""
    if "vae" not in inventory.components:
        return 0.0
    shapes = {w.name.removesuffix(".weight"): w.shape for w in inventory.components["vae"]}
    return facts.model.vae_encode(shapes, settings.resolution**2, settings.frames or 1)


def _activation_dtype_bytes(settings: PlanSettings) -> float:
    """float32 activations unless the weights or autocast are in half precision."""
    if settings.mixed_precision != "no":
        return 2
    return TORCH_DTYPE_BYTES[settings.dtype]


def _host_runtime(device: str) -> Part:
    """Python and its libraries in RAM (on a GPU machine, CUDA's libraries too)."""
    if device == "cuda":
        return Part("runtime (Python, torch, CUDA libraries)", CUDA_RUNTIME_RAM)
    return Part("runtime (Python, torch, libraries)", CPU_RUNTIME)


def _runtime(device: str) -> Part:
    """The runtime's share of the device: on a GPU its CUDA context; on the CPU, RAM."""
    return Part("CUDA context and library workspaces", CUDA_CONTEXT) if device == "cuda" else _host_runtime(device)


def _latent_frames(settings: PlanSettings, model: ActivationModel) -> int:
    """Latent frames of a clip: a causal video VAE keeps the first frame and compresses the rest."""
    if not (settings.frames and model.temporal_factor):
        return 1
    return (settings.frames - 1) // model.temporal_factor + 1


def _architecture(inventory: BaseInventory) -> Architecture:
    from lora_cli.models import ARCHITECTURES

    for architecture in ARCHITECTURES:
        if architecture.matches(inventory.pipeline_class) and architecture.name in ACTIVATION_MODELS:
            return architecture
    raise ModelLoadError(f"model.path: no memory model for a {inventory.pipeline_class} yet")


def _largest(phases: dict[str, tuple[Part, ...]]) -> str:
    """The phase that needs most; of equals, the one with most file pages resident too."""
    return max(phases, key=lambda name: (needed(phases[name]), resident(phases[name])))


def plan_preset(preset: Preset, device: str = "cuda", images: int | None = None) -> MemoryPlan:
    """The memory plan of a preset (with `images` training images, if known), reading only the base's
    safetensors headers."""
    from lora_cli.planning.inventory import read_inventory

    return estimate_memory(read_inventory(preset.model), PlanSettings.from_preset(preset, images), device)
