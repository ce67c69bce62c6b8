"""Turn batches of images and captions into VAE encodings and text conditioning, cached or live."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lora_cli.config.schema import Preset
from lora_cli.models.base import LoadedBase
from lora_cli.training.cache import EncodingCache
from lora_cli.training.data import TrainingData

CACHE_BATCH = 2  # images per VAE call while caching: its activations, not speed, set the peak
TEXT_CACHE_BATCH = 16  # captions per text-encoder call while caching (padded to one length, so batching is free)


class BatchEncoder:
    """Serves encodings for dataset items and conditioning for captions on the training device."""

    def __init__(self, base: LoadedBase, data: TrainingData, preset: Preset, device: torch.device) -> None:
        self.base = base
        self.data = data
        self.preset = preset
        self.device = device
        self.text_trainable = preset.adapter.text_encoder
        self._latents: dict[int, torch.Tensor] = {}
        self._prompts: dict[str, dict[str, torch.Tensor]] = {}

    def fill_caches(self, cache_root: object, keep_encoders: bool, on_progress: Callable[[str], None]) -> None:
        """Encode everything once (reusing disk entries), then free the encoders unless previews need them."""
        base, cache = self.base, self.preset.cache
        if cache.latents:
            on_progress("caching latents")
            store = EncodingCache(cache_root / "latents", f"vae:{base.identity.fingerprint}")
            self._cache_latents(store)
            if not keep_encoders:
                base.vae = None
        if cache.text_embeddings:
            on_progress("caching text embeddings")
            tokens = base.pipeline_extras.get("text_tokens")  # T5 length: embeddings differ with it
            store = EncodingCache(cache_root / "text", f"text:{base.identity.fingerprint}:{tokens}")
            self._cache_prompts(store)
            if not keep_encoders:
                base.text_encoders = {}

    def encodings(self, item_indices: list[int]) -> torch.Tensor:
        """VAE latent-distribution parameters for the items, [B, 2C, h, w] on the device."""
        if self._latents:
            return self._to_device(torch.stack([self._latents[i] for i in item_indices]))
        pixels = torch.stack([self.data.pixels(i) for i in item_indices])
        with torch.no_grad():
            return self.base.architecture.encode_images(self.base, pixels.to(self.device))

    def conditioning(self, captions: list[str]) -> dict[str, torch.Tensor]:
        if self._prompts:
            return {
                key: self._to_device(torch.stack([self._prompts[c][key] for c in captions]))
                for key in self._prompts[captions[0]]
            }
        with torch.set_grad_enabled(self.text_trainable and torch.is_grad_enabled()):
            return self.base.architecture.encode_prompts(self.base, captions)

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        """A cached batch to the device; to a GPU through pinned memory without waiting, so the host queues the
        copy and goes on queuing the step's kernels while the device still runs the previous step."""
        if self.device.type != "cuda":
            return batch.to(self.device)
        return batch.pin_memory().to(self.device, non_blocking=True)

    def _cache_latents(self, store: EncodingCache) -> None:
        pending = []
        for index, digest in enumerate(self.data.digests):
            width, height = self.data.buckets[index]
            key = store.key(digest, f"{width}x{height}", f"{self.data.frames}@{self.data.fps}")
            cached = store.get(key)
            if cached is None:
                pending.append((index, key))
            else:
                self._latents[index] = cached["encoding"]
        for start in range(0, len(pending), CACHE_BATCH):
            chunk = pending[start : start + CACHE_BATCH]
            by_size: dict[tuple[int, int], list[tuple[int, str]]] = {}
            for index, key in chunk:
                by_size.setdefault(self.data.buckets[index], []).append((index, key))
            for size, group in by_size.items():
                pixels = torch.stack([self.data.pixels(i, size) for i, _ in group])
                with torch.no_grad():
                    encoded = self.base.architecture.encode_images(self.base, pixels.to(self.device)).cpu()
                for (index, key), encoding in zip(group, encoded, strict=True):
                    store.put(key, {"encoding": encoding})
                    self._latents[index] = encoding

    def _cache_prompts(self, store: EncodingCache) -> None:
        pending = []
        for caption in sorted({item.caption for item in self.data.items} | {""}):
            cached = store.get(store.key(caption))
            if cached is None:
                pending.append(caption)
            else:
                self._prompts[caption] = cached
        for start in range(0, len(pending), TEXT_CACHE_BATCH):
            chunk = pending[start : start + TEXT_CACHE_BATCH]
            with torch.no_grad():
                encoded = self.base.architecture.encode_prompts(self.base, chunk)
            for index, caption in enumerate(chunk):
                cached = {name: value[index].float().cpu() for name, value in encoded.items()}
                store.put(store.key(caption), cached)
                self._prompts[caption] = cached
