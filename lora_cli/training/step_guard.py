"""An optimizer step that takes effect only where a device-side flag says the gradients were finite, without the
host ever reading the flag (as GradScaler keeps `found_inf` on the device): the training loop never waits for
the accelerator between steps, and non-finite steps are still dropped exactly.

Works for torch's Adam/AdamW. The fused kernel (the default) takes the flag itself, as GradScaler hands it
`found_inf`: where it is set the kernel changes nothing and the step count is taken back, at no cost. The foreach
and plain ones have their parameters and state copied before the step and put back where the flag is false.
Optimizers that keep state in Python numbers (Prodigy's step size, bitsandbytes' 8-bit blocks) are stepped only
after the host has read the flag.
"""

from __future__ import annotations

import torch


def supports_deferred_skip(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `guarded_step` can undo this optimizer's step on the device alone."""
    return type(optimizer) in (torch.optim.AdamW, torch.optim.Adam)


def guarded_step(optimizer: torch.optim.Optimizer, finite: torch.Tensor, inner: torch.optim.Optimizer) -> None:
    """`optimizer.step()` (`inner` is the torch optimizer it wraps, or itself), without effect on the device where
    `finite` (a 0-d bool tensor) is false: parameters and state stay what they were; state a first step created
    is zero (a fresh optimizer's)."""
    if all(group.get("fused") for group in inner.param_groups):
        inner.found_inf = (~finite).to(torch.float32)  # read by Adam.step for its fused kernel
        try:
            optimizer.step()
        finally:
            del inner.found_inf
        return
    before = {id(t): _local(t).clone() for t in _state_tensors(optimizer)}
    optimizer.step()
    for tensor in _state_tensors(optimizer):
        local = _local(tensor)
        previous = before.get(id(tensor))
        kept = previous if previous is not None else torch.zeros_like(local)
        local.copy_(torch.where(finite.to(local.device), local, kept))


def _state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    tensors = [p for group in optimizer.param_groups for p in group["params"]]
    for state in optimizer.state.values():
        tensors += [value for value in state.values() if isinstance(value, torch.Tensor)]
    return tensors


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded (FSDP) tensor's local shard, which steps and copies act on; any other tensor itself."""
    from torch.distributed.tensor import DTensor

    data = tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor
    return data.to_local() if isinstance(data, DTensor) else data
