"""`lora-transfer`: carry an adapter trained on one base to another base of the same architecture, training-free
(after LoRA-X, Farhadzadeh et al., ICLR 2025).

Per adapted layer, with W_s and W_t the source and target weights (convolutions as out x in·kh·kw matrices)
and ΔW_s the adapter's full update on the source (DoRA: merged minus W_s):

- each weight's principal subspaces are its truncated SVD, U_k and V_k with the fewest singular values whose
  squares hold `energy` of the total (W = U Σ Vᵀ); P = U_k U_kᵀ and the same for V;
- similarity = min(sim(U_s, U_t), sim(V_s, V_t)), where for orthonormal A (n x a) and B (n x b)
  sim = (‖AᵀB‖²_F − ab/n) / (min(a, b) − ab/n), clipped to [0, 1]: 1 when the subspaces coincide, 0 when they
  overlap no more than random subspaces of those sizes would (and 1 when one of them is the whole space);
- a layer whose similarity reaches `threshold` is carried over, the others are skipped and listed:
  - `rotate` (default): ΔW_t = Q_U ΔW_s Q_Vᵀ, Q the direct rotation (Davis & Kahan, 1970) taking the source's
    subspace to the target's and its complement to the target's complement: the orthogonal polar factor of
    P_t P_s + (I − P_t)(I − P_s). It is the identity where the subspaces agree, so nothing is lost there;
  - `project` (LoRA-X's transfer): ΔW_t = P_Ut ΔW_s P_Vt. LoRA-X adapters are trained inside the source's
    subspaces, which this keeps; an adapter trained the usual way is not, and loses what lies outside;
- ΔW_t is written as LoRA by truncated SVD at the layer's own rank (or the rank/energy asked for).

Layers are matched by name and shape; those the target lacks or shapes differently are reported and skipped.
Weights are read one layer at a time from both bases' safetensors headers, as `lora-merge` reads them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_cli.adapters.catalog import ModuleCatalog
from lora_cli.adapters.files import AdapterFile, read_adapter
from lora_cli.adapters.functional import layer_rank, merged_weight
from lora_cli.adapters.keys import AdapterTensors, ModuleKey
from lora_cli.errors import AdapterError, OutputExistsError
from lora_cli.models.source import BaseSource
from lora_cli.models.weights import BaseWeights, open_base_weights
from lora_cli.toolbox.lowrank import low_rank, output_format, save_lora


@dataclass(frozen=True)
class LayerSimilarity:
    module: str  # component.module
    similarity: float
    change: float  # ‖ΔW_t − ΔW_s‖ / ‖ΔW_s‖: how much carrying it over changed the update


@dataclass
class TransferReport:
    layers: list[LayerSimilarity]
    threshold: float
    written: dict[str, int] = field(default_factory=dict)  # module: rank written
    missing: list[str] = field(default_factory=list)  # layers the target has no module for
    reshaped: list[str] = field(default_factory=list)  # layers whose module the target shapes differently

    @property
    def skipped(self) -> list[LayerSimilarity]:
        return [layer for layer in self.layers if layer.similarity < self.threshold]


def principal_subspaces(weight: torch.Tensor, energy: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_k, V_k): orthonormal bases of the column and row spaces holding `energy` of the squared spectrum."""
    u, s, vh = torch.linalg.svd(weight.float().flatten(1), full_matrices=False)
    squares = s.pow(2)
    share = torch.cumsum(squares, 0) / squares.sum().clamp_min(torch.finfo(torch.float32).tiny)
    k = int((share < min(energy, 1.0) - 1e-6).sum()) + 1
    k = max(1, min(k, s.numel()))
    return u[:, :k], vh[:k].T


def subspace_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Chance-corrected overlap of the spans of orthonormal `a` (n x ka) and `b` (n x kb), in [0, 1]."""
    n, ka, kb = a.shape[0], a.shape[1], b.shape[1]
    chance, best = ka * kb / n, min(ka, kb)
    if best - chance <= 1e-9:
        return 1.0  # one of them is (nearly) the whole space: projecting onto it changes nothing
    overlap = float((a.T @ b).pow(2).sum())
    return min(1.0, max(0.0, (overlap - chance) / (best - chance)))


def project(delta: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """P_U ΔW P_V for orthonormal bases U (out x k) and V (in x k), as a matrix."""
    return left @ (left.T @ delta @ right) @ right.T


def direct_rotation(source: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The direct rotation Q from span(source) to span(target) as (B, R) with Q = I + B (R − I) Bᵀ: it moves only
    vectors in span(source, target) (orthonormal basis B), so it is computed there, at most 2k wide."""
    n = source.shape[0]
    basis = torch.linalg.qr(torch.cat([source, target], 1)).Q if source.shape[1] + target.shape[1] < n else None
    basis = torch.eye(n, device=source.device) if basis is None else basis
    inner_source, inner_target = basis.T @ source, basis.T @ target
    projector_source, projector_target = inner_source @ inner_source.T, inner_target @ inner_target.T
    identity = torch.eye(basis.shape[1], device=source.device)
    u, _, vh = torch.linalg.svd(
        projector_target @ projector_source + (identity - projector_target) @ (identity - projector_source)
    )
    return basis, u @ vh - identity


def rotate(delta: torch.Tensor, left: tuple, right: tuple) -> torch.Tensor:
    """Q_U ΔW Q_Vᵀ with each rotation given as `direct_rotation` returns it."""
    (left_basis, left_turn), (right_basis, right_turn) = left, right
    turned = delta + left_basis @ (left_turn @ (left_basis.T @ delta))
    return turned + ((turned @ right_basis) @ right_turn.T) @ right_basis.T


def carry(delta: torch.Tensor, source_weight: torch.Tensor, target_weight: torch.Tensor, energy: float, method: str):
    """(similarity, carried update in ΔW's shape) for one layer."""
    matrix = delta.float().flatten(1)
    source_left, source_right = principal_subspaces(source_weight, energy)
    target_left, target_right = principal_subspaces(target_weight, energy)
    similarity = min(subspace_similarity(source_left, target_left), subspace_similarity(source_right, target_right))
    if method == "project":
        carried = project(matrix, target_left, target_right)
    else:
        carried = rotate(matrix, direct_rotation(source_left, target_left), direct_rotation(source_right, target_right))
    return similarity, carried.reshape(delta.shape)


@dataclass(frozen=True)
class _Layer:
    key: ModuleKey
    measured: LayerSimilarity
    carried: torch.Tensor


def _compare(
    file: AdapterFile, source: BaseWeights, target: BaseWeights, energy: float, method: str, report: TransferReport
) -> Iterator[_Layer]:
    """Every adapter layer the target has, with its similarity and carried update, one at a time."""
    source_shapes, target_shapes = source.adaptable_shapes(), target.adaptable_shapes()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the SVDs are the cost
    for key, named in file.tensors.items():
        name = f"{key[0]}.{key[1]}"
        if key not in target_shapes:
            report.missing.append(name)
            continue
        if target_shapes[key] != source_shapes[key]:
            report.reshaped.append(name)
            continue
        source_weight, target_weight = (base.read_weight(key).to(device, torch.float32) for base in (source, target))
        named = {tensor: value.to(device) for tensor, value in named.items()}
        delta = merged_weight(source_weight, named) - source_weight
        similarity, carried = carry(delta, source_weight, target_weight, energy, method)
        change = float((carried - delta).norm() / delta.norm().clamp_min(torch.finfo(torch.float32).tiny))
        measured = LayerSimilarity(name, similarity, change)
        report.layers.append(measured)
        yield _Layer(key, measured, carried)


def check_one_architecture(before: BaseSource, after: BaseSource, source: str, target: str) -> None:
    if before.architecture is not after.architecture:
        raise AdapterError(
            f"{target} is a {after.architecture.name} and {source} a {before.architecture.name}; transfer needs "
            "two bases of one architecture"
        )


def transferred_from(adapter: Path, source: str, target: str, fingerprints: dict[str, str], method: str) -> dict:
    """The start of every `lora_cli.transferred_from` record: the adapter, both bases and the method."""
    return {
        "adapter": adapter.name,
        "source": source,
        "source_fingerprint": fingerprints["source"],
        "target": target,
        "target_fingerprint": fingerprints["target"],
        "method": method,
    }


@contextmanager
def _opened(adapter: Path, source: str, target: str) -> Iterator[tuple[AdapterFile, BaseWeights, BaseWeights]]:
    """The adapter read against SOURCE, and both bases open for reading; they must be one architecture."""
    with open_base_weights(source, "--from") as before, open_base_weights(target, "--to") as after:
        check_one_architecture(before.source, after.source, source, target)
        yield read_adapter(adapter, ModuleCatalog.from_weights(before)), before, after


def carry_over(adapter: Path, source: str, target: str, threshold: float, energy: float, method: str) -> TransferReport:
    """How well ADAPTER (trained on SOURCE) carries over to TARGET, layer by layer; nothing is written."""
    report = TransferReport([], threshold)
    with _opened(adapter, source, target) as (file, before, after):
        for _ in _compare(file, before, after, energy, method, report):
            pass
    return report


def transfer(
    adapter: Path,
    source: str,
    target: str,
    out: Path,
    threshold: float,
    energy: float,
    method: str,
    rank: int | None = None,
    rank_energy: float | None = None,
) -> TransferReport:
    """Write OUT: ADAPTER's layers whose subspaces are similar enough, carried to TARGET by `method`, as LoRA."""
    if out.exists():
        raise OutputExistsError(f"{out} already exists; choose a new file (nothing is overwritten)")
    report = TransferReport([], threshold)
    result: AdapterTensors = {}
    with _opened(adapter, source, target) as (file, before, after):
        for layer in _compare(file, before, after, energy, method, report):
            if layer.measured.similarity < threshold:
                continue
            kept_rank = rank if rank is not None or rank_energy is not None else layer_rank(file.tensors[layer.key])
            result[layer.key], _ = low_rank(layer.carried, kept_rank, rank_energy)
            report.written[layer.measured.module] = int(result[layer.key]["alpha"])
        if not result:
            highest = max((layer.similarity for layer in report.layers), default=0.0)
            raise AdapterError(
                f"{adapter}: no layer reaches similarity {threshold} with {target} (highest {highest:.2f}); "
                "nothing to write. Lower --threshold to transfer anyway"
            )
        fingerprints = {"source": before.source.fingerprint(), "target": after.source.fingerprint()}
        record = {
            **transferred_from(adapter, source, target, fingerprints, method),
            "subspace_energy": energy,
            "threshold": threshold,
            "transferred_layers": len(result),
            "skipped_layers": len(report.skipped) + len(report.missing) + len(report.reshaped),
        }
        metadata = {
            "lora_cli.transferred_from": json.dumps(record),
            "lora_cli.base_model": target,
            "lora_cli.base_fingerprint": fingerprints["target"],
        }
        save_lora(out, result, file.architecture, output_format(file), metadata)
    return report
