"""The math of each algorithm as plain tensor functions over file tensors (kohya/LyCORIS names).

Independent of peft: used to merge adapters into weights and to check peft's layers in tests. All math is in
float32; alpha follows the readers' rules (A1111, ComfyUI, LyCORIS): scale = alpha / rank of the low-rank
factor, and 1 for LoKr with two full factors.
"""

from __future__ import annotations

import torch

Named = dict[str, torch.Tensor]


def lora_delta(named: Named, shape: torch.Size) -> torch.Tensor:
    """(alpha / r) * up @ down, convolutions as (out, in * kh * kw) matrices."""
    down, up = named["lora_down.weight"].float(), named["lora_up.weight"].float()
    scale = _alpha(named, down.shape[0]) / down.shape[0]
    return (up.flatten(1) @ down.flatten(1)).reshape(shape).mul_(scale)


def loha_delta(named: Named, shape: torch.Size) -> torch.Tensor:
    """(alpha / r) * (w1a @ w1b) * (w2a @ w2b) (LyCORIS loha.py, non-Tucker form)."""
    w1a, w1b, w2a, w2b = (named[k].float() for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    scale = _alpha(named, w1a.shape[1]) / w1a.shape[1]
    return ((w1a @ w1b) * (w2a @ w2b)).reshape(shape) * scale


def lokr_delta(named: Named, shape: torch.Size) -> torch.Tensor:
    """scale * kron(w1, w2), each factor full or a low-rank product (LyCORIS lokr.py)."""
    rank = None
    if "lokr_w1" in named:
        w1 = named["lokr_w1"].float()
    else:
        w1 = named["lokr_w1_a"].float() @ named["lokr_w1_b"].float()
        rank = named["lokr_w1_a"].shape[1]
    out2, in2 = shape[0] // w1.shape[0], shape[1] // w1.shape[1]
    if "lokr_w2" in named:
        w2 = named["lokr_w2"].float()
    else:
        w2 = named["lokr_w2_a"].float() @ named["lokr_w2_b"].float()
        rank = named["lokr_w2_a"].shape[1]
    w2 = w2.reshape(out2, in2, *shape[2:])
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    scale = 1.0 if rank is None else _alpha(named, rank) / rank
    return torch.kron(w1, w2).reshape(shape) * scale


def delta_weight(named: Named, shape: torch.Size) -> torch.Tensor:
    """The weight update of one module, whichever algorithm its tensors belong to."""
    if "lora_down.weight" in named:
        return lora_delta(named, shape)
    if "hada_w1_a" in named:
        return loha_delta(named, shape)
    return lokr_delta(named, shape)


def merged_weight(weight: torch.Tensor, named: Named, strength: float = 1.0) -> torch.Tensor:
    """W + strength * delta in float32; with `dora_scale`, the DoRA renormalisation per output channel."""
    base = weight.float()
    if "dora_scale" not in named:
        return delta_weight(named, weight.shape).mul_(strength).add_(base)
    combined = base + delta_weight(named, weight.shape)
    view = (-1, *[1] * (weight.dim() - 1))
    norm = combined.flatten(1).norm(dim=1).reshape(view)
    magnitude = named["dora_scale"].float().reshape(view)
    return base + strength * (magnitude * combined / norm - base)


RANK_AXES = (("lora_down.weight", 0), ("hada_w1_a", 1), ("lokr_w2_a", 1), ("lokr_w1_a", 1))


def layer_rank(named: Named) -> int:
    """The rank a layer was trained at (LoKr with two full factors stores alpha = rank)."""
    for name, axis in RANK_AXES:
        if name in named:
            return int(named[name].shape[axis])
    return int(round(float(named.get("alpha", 0))))


def _alpha(named: Named, rank: int) -> float:
    return float(named["alpha"]) if "alpha" in named else float(rank)
