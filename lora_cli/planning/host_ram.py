"""RAM of a GPU run after loading, as `build_session` moves the base: while the caches fill the denoiser waits on
the host and the encoders go to the GPU (with block offloading the text encoders' blocks first get pinned host
copies); then the denoiser's offloaded blocks get theirs, and the rest of it moves to the GPU."""

from __future__ import annotations

from lora_cli.planning.offload import streamed_bytes
from lora_cli.planning.parts import Part
from lora_cli.planning.stored import StoredWeights


def gpu_run_host_phases(
    weights: StoredWeights, runtime: Part, released: set[str], offloaded: tuple[int, ...]
) -> dict[str, tuple[Part, ...]]:
    """The "cache" phase (with caching) and the "start" phase, when the denoiser leaves for the GPU: the most RAM
    training holds afterwards (only the pinned copies stay) is part of it. `released`: the encoders let go once
    the caches are full; `offloaded`: the offloaded blocks' bytes."""
    settings, denoiser = weights.settings, weights.denoiser
    encoders = [name for name in weights.inventory.components if name != denoiser]
    text_encoders = streamed_encoders(weights)
    caching = settings.cache_latents or settings.cache_text_embeddings
    waiting = _waiting_denoiser(weights)
    phases = {}
    if caching:
        cache = [runtime, *_read_on_the_way(weights, encoders), *waiting]
        phases["cache"] = (*cache, *_streamed_encoders(weights, text_encoders, converting=True))
    start = [runtime, *_read_on_the_way(weights, [denoiser] if caching else [denoiser, *encoders]), *waiting]
    if caching:
        start += _streamed_encoders(weights, [name for name in text_encoders if name not in released], False)
    else:
        start += _streamed_encoders(weights, text_encoders, converting=True)
    if offloaded:  # copied before the denoiser's own tensors are let go
        start.append(Part(f"offloaded blocks (pinned host memory, {len(offloaded)} blocks)", sum(offloaded)))
    phases["start"] = tuple(start)
    return phases


def _waiting_denoiser(weights: StoredWeights) -> list[Part]:
    """The denoiser on the host until it moves to the GPU: its fp8/4-bit copy, a converted copy, or (int8, which
    bitsandbytes quantizes on the move) its full-precision weights; memory-mapped and unquantized, nothing yet."""
    denoiser, mode = weights.denoiser, weights.settings.quantize
    if mode == "int8":
        full = weights.component_bytes(denoiser, quantize=False)
        return [Part(f"weights: {denoiser} (int8 on its way to the GPU)", full, weights.in_model_dtype(denoiser))]
    if weights.mapped(denoiser):
        return []
    what = "quantized" if mode != "none" else "converted"
    return [Part(f"weights: {denoiser} ({what}, until it moves to the GPU)", weights.component_bytes(denoiser))]


def _read_on_the_way(weights: StoredWeights, names: list[str]) -> list[Part]:
    """File pages of the memory-mapped components among `names`, read on their way to the GPU."""
    return [
        Part(f"weights: {name} (file read on the way to the GPU)", weights.component_bytes(name), file_pages=True)
        for name in names
        if weights.mapped(name)
    ]


def _streamed_encoders(weights: StoredWeights, names: list[str], converting: bool) -> list[Part]:
    """With block offloading, the pinned host copies of the text encoders' blocks among `names`; `converting`:
    when the copies are made, beside a converted encoder's own weights."""
    if not weights.settings.offload_blocks:
        return []
    parts = []
    for name in names:
        found = streamed_blocks(weights, name)
        if found:
            parts.append(Part(f"weights: {name} ({found[1]} blocks in pinned host memory)", found[2]))
            if converting and not weights.mapped(name):
                parts.append(
                    Part(f"weights: {name} (converted, while its blocks are copied)", weights.component_bytes(name))
                )
    return parts


def streamed_encoders(weights: StoredWeights) -> list[str]:
    """The components whose blocks stream with block offloading: the text encoders (neither denoiser nor VAE)."""
    return [name for name in weights.inventory.components if name not in (weights.denoiser, "vae")]


def streamed_blocks(weights: StoredWeights, name: str) -> tuple[int, int, int] | None:
    """A text encoder's bytes on the GPU, block count and pinned host bytes when its blocks stream."""
    full = weights.component_bytes(name)
    return streamed_bytes(weights.inventory.components[name], full, lambda w: weights.weight_bytes(w, set()))
