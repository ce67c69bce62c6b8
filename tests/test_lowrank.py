"""`low_rank`, the factorisation behind lora-resize, lora-extract and lora-transfer, on updates nobody designed
(hypothesis): torch.linalg.matrix_rank is the referee for energy 1, a float64 SVD for other energies."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_cli.toolbox.lowrank import low_rank


@st.composite
def updates(draw: st.DrawFn) -> torch.Tensor:
    """A float32 update of a chosen rank whose singular values span up to five orders of magnitude; a
    convolution's (out, in, k, k) shape or a linear layer's."""
    out_features, in_features = draw(st.integers(2, 48)), draw(st.integers(2, 48))
    kernel = draw(st.sampled_from([None, 1, 3]))
    columns = in_features * (kernel or 1) ** 2
    rank = draw(st.integers(1, min(out_features, columns)))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    left, _ = torch.linalg.qr(torch.randn(out_features, rank, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(columns, rank, generator=generator, dtype=torch.float64))
    spread = draw(st.floats(0.0, 5.0))
    values = torch.logspace(0.0, -spread, rank, dtype=torch.float64) * draw(st.floats(1e-3, 1e3))
    delta = ((left * values) @ right.T).float()
    return delta if kernel is None else delta.reshape(out_features, in_features, kernel, kernel)


def rebuilt(named: dict[str, torch.Tensor]) -> torch.Tensor:
    return named["lora_up.weight"].flatten(1) @ named["lora_down.weight"].flatten(1)


@settings(max_examples=60, deadline=None)
@given(updates())
def test_energy_one_keeps_the_numerical_rank_and_the_update(delta: torch.Tensor) -> None:
    named, kept = low_rank(delta, None, 1.0)
    matrix = delta.flatten(1)
    rank = named["lora_down.weight"].shape[0]
    assert rank == int(torch.linalg.matrix_rank(matrix))
    # what is dropped lies under matrix_rank's tolerance (largest singular value x eps x larger side) each
    noise = (min(matrix.shape) - rank) ** 0.5 * torch.finfo(torch.float32).eps * max(matrix.shape)
    assert float((rebuilt(named) - matrix).norm()) <= (1e-5 + noise) * float(matrix.norm())
    assert kept > 1 - 1e-6
    if delta.dim() == 4:
        assert named["lora_down.weight"].shape[1:] == delta.shape[1:] and named["lora_up.weight"].dim() == 4


@settings(max_examples=60, deadline=None)
@given(updates(), st.floats(0.05, 0.999))
def test_an_energy_keeps_the_fewest_directions_that_hold_it(delta: torch.Tensor, energy: float) -> None:
    named, kept = low_rank(delta, None, energy)
    rank = named["lora_down.weight"].shape[0]
    shares = torch.linalg.svdvals(delta.flatten(1).double()).pow(2)
    shares = torch.cumsum(shares, 0) / shares.sum()
    assert kept >= energy - 1e-6 and abs(kept - float(shares[rank - 1])) < 1e-6
    assert rank == 1 or float(shares[rank - 2]) < energy + 1e-6
