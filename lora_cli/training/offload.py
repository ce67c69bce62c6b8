"""Block offloading (`train.offload_blocks: N`): the frozen weights of N of the denoiser's repeated blocks live
in host memory (pinned on CUDA) and are copied to the device just before each block runs.

Each offloaded block's frozen parameters and buffers are emptied on the device (a zero-size placeholder stands in
for each); a forward pre-hook puts device copies in, and takes out those of any other offloaded block, and a
forward hook takes them out again when the block's forward pass completes. With gradient checkpointing the block
runs twice per step — forward, and again in backward to recompute its activations (torch may stop that second run
early, once it has what backward needs, so the next block's pre-hook is what clears it) — and autograd keeps the
copies of the second run alive exactly until the block's backward is done. So at most the running block and the
one being prefetched are on the device (between steps, the last one used). On CUDA the next block in the
direction of travel is copied on a side stream while the current one computes. Adapter weights never move.
The text encoders' blocks stream the same way while they encode (`stream_text_encoders`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import InitVar, dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from lora_cli.errors import PresetError
from lora_cli.training.host_copies import host_copies

if TYPE_CHECKING:
    from lora_cli.models.base import LoadedBase


Held = list[tuple[torch.Tensor, torch.Tensor]]  # a block's frozen tensors, each with its host copy


@dataclass
class BlockOffloader:
    """Moves the frozen weights of `blocks` between host and `device` around each block's forward pass. It keeps
    no reference to the blocks (their hooks keep it): a released module's host copies are freed with it, with no
    reference cycle waiting for the garbage collector (T5-XXL's 9 GiB of pinned copies after caching; the session
    then hands torch's cached pinned memory back to the system)."""

    blocks: InitVar[list[nn.Module]]
    device: torch.device
    _held: list[Held] = field(default_factory=list)
    _staged: dict[int, tuple[list[torch.Tensor], torch.cuda.Event | None]] = field(default_factory=dict)
    _loaded: set[int] = field(default_factory=set)
    _last: int | None = None
    _stream: torch.cuda.Stream | None = None
    _hooks: list = field(default_factory=list)

    def __post_init__(self, blocks: list[nn.Module]) -> None:
        pinned = self.device.type == "cuda"
        if pinned:
            self._stream = torch.cuda.Stream(self.device)
        frozen = [[p for p in b.parameters() if not p.requires_grad] + list(b.buffers()) for b in blocks]
        made = iter(host_copies([tensor for block in frozen for tensor in block], pinned))
        for index, module in enumerate(blocks):
            self._held.append([(tensor, next(made)) for tensor in frozen[index]])
            self._hooks += [
                module.register_forward_pre_hook(lambda _module, _args, i=index: self._load(i)),
                module.register_forward_hook(lambda _module, _args, _output, i=index: self._unload(i)),
            ]
            self._unload(index)

    @property
    def block_count(self) -> int:
        return len(self._held)

    @property
    def host_bytes(self) -> int:
        return sum(copy.numel() * copy.element_size() for block in self._held for _, copy in block)

    def on_device(self, index: int) -> bool:
        """Whether block `index`'s frozen weights are on the device now."""
        return all(tensor.numel() == copy.numel() for tensor, copy in self._held[index])

    def close(self) -> None:
        """Stop offloading: the hooks go and every tensor holds its host copy again (on the host)."""
        for hook in self._hooks:
            hook.remove()
        for block in self._held:
            for tensor, copy in block:
                tensor.data = copy
        self._hooks, self._staged, self._loaded = [], {}, set()

    def _load(self, index: int) -> None:
        for other in self._loaded - {index}:
            self._unload(other)
        if index not in self._loaded:
            copies, ready = self._staged.pop(index, None) or self._copy(index)
            if ready is not None:
                torch.cuda.current_stream(self.device).wait_event(ready)
            for (tensor, _), copy in zip(self._held[index], copies, strict=True):
                tensor.data = copy
            self._loaded.add(index)
        direction = 1 if self._last is None or index >= self._last else -1  # backward recomputes in reverse
        self._last = index
        following = index + direction
        if self._stream is not None and 0 <= following < len(self._held) and following not in self._staged:
            self._staged[following] = self._copy(following)

    def _unload(self, index: int) -> None:
        for tensor, copy in self._held[index]:
            tensor.data = torch.empty(0, dtype=copy.dtype, device=self.device)
        self._loaded.discard(index)

    def _copy(self, index: int) -> tuple[list[torch.Tensor], torch.cuda.Event | None]:
        """Device copies of block `index`'s frozen tensors; on CUDA issued on the side stream, with its event."""
        if self._stream is None:
            return [copy.to(self.device) for _, copy in self._held[index]], None
        with torch.cuda.stream(self._stream):
            copies = [copy.to(self.device, non_blocking=True) for _, copy in self._held[index]]
            ready = torch.cuda.Event()
            ready.record(self._stream)
        for copy in copies:  # used on the main stream: not freed while that stream may still read it
            copy.record_stream(torch.cuda.current_stream(self.device))
        return copies, ready


def offloaded_blocks(names: list[str], count: int) -> list[str]:
    """The blocks to offload: the last `count` in execution order (the first blocks run first in forward and
    last in backward, so keeping them resident spares a copy at each turn)."""
    return names[len(names) - count :] if count else []


def offload_denoiser(base: LoadedBase, count: int, device: torch.device) -> BlockOffloader:
    """Offload the last `count` of the denoiser's repeated blocks (a DiT's: a UNet checkpoints the layers inside
    its blocks, not the blocks, so its weights would be needed while they are away)."""
    architecture = base.architecture
    if architecture.denoiser_name != "transformer":
        raise PresetError(
            f"train.offload_blocks: {architecture.name} is a UNet; offloading covers the diffusion-transformer "
            "bases, whose blocks are what gradient checkpointing recomputes. Set it to 0 (use model.quantize to save "
            "memory)"
        )
    names = architecture.blocks(base.denoiser)
    if count > len(names):
        raise PresetError(f"train.offload_blocks: {count}, but this {architecture.name} has {len(names)} blocks")
    blocks = [base.denoiser.get_submodule(name) for name in offloaded_blocks(names, count)]
    return BlockOffloader(blocks, device)


def repeated_blocks(module: nn.Module) -> list[nn.Module]:
    """The blocks of a text encoder's main stack: its largest ModuleList (T5's `encoder.block`, CLIP's
    `text_model.encoder.layers`)."""
    lists = [child for child in module.modules() if isinstance(child, nn.ModuleList) and len(child) > 1]
    if not lists:
        return []
    return list(max(lists, key=lambda blocks: sum(p.numel() for p in blocks.parameters())))


def stream_text_encoders(base: LoadedBase, device: torch.device) -> list[BlockOffloader]:
    """Offload every block of each text encoder too: while they encode (the caches, or each batch uncached) at
    most two of their blocks are on the device, which is what makes T5-XXL's 9 GiB fit a small GPU. A text
    encoder that trains keeps its copies until backward (no checkpointing there), so it saves nothing."""
    return [BlockOffloader(blocks, device) for blocks in map(repeated_blocks, base.text_encoders.values()) if blocks]


@contextmanager
def offloaded_while_drawing(base: LoadedBase, count: int, device: torch.device) -> Iterator[None]:
    """The denoiser's last `count` blocks and the text encoders' blocks offloaded for a drawing (prior images
    before training starts), then back on the host whole, ready for the session's own offloading."""
    offloaders = [offload_denoiser(base, count, device), *stream_text_encoders(base, device)]
    try:
        yield
    finally:
        for offloader in offloaders:
            offloader.close()


def offload_summary(offloader: BlockOffloader, total_blocks: int) -> str:
    where = "pinned host memory" if offloader.device.type == "cuda" else "host memory"
    return (
        f"offloading {offloader.block_count} of {total_blocks} blocks: {offloader.host_bytes / 2**20:,.0f} MiB of "
        f"frozen weights in {where}, copied to the {offloader.device.type} block by block; the text encoders' "
        "blocks stream the same way while they encode"
    )
