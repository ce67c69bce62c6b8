"""`lora-transfer` and `lora-info --from`: an adapter carried to a related base keeps its update inside the
target's principal subspaces; unrelated bases, missing and reshaped layers are reported, never dropped silently."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_cli.adapters.functional import delta_weight, merged_weight
from lora_cli.models.source import open_base_source
from lora_cli.toolbox.transfer import direct_rotation, principal_subspaces, rotate, subspace_similarity
from tests.conftest import base_weights, invoke, read_for_base

UNET_FILE = Path("unet") / "diffusion_pytorch_model.safetensors"


def rewrite_unet(source: Path, folder: Path, change) -> Path:
    """A copy of the base whose UNet tensors pass through `change(name, tensor)` (None drops the tensor)."""
    shutil.copytree(source, folder)
    path = folder / UNET_FILE
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    tensors = {name: change(name, value) for name, value in load_file(str(path)).items()}
    save_file({name: value for name, value in tensors.items() if value is not None}, str(path), metadata=metadata)
    return folder


@pytest.fixture(scope="module")
def targets(tiny_sd: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`tuned`: every adapted weight moved by 20% of its spread (a fine-tune); `reseeded`: the same architecture
    initialised from another seed; `pruned`: one attention projection removed, another of a new shape."""
    from lora_cli.toy.tiny_pipeline import build_tiny_sd

    folder = tmp_path_factory.mktemp("transfer-targets")
    generator = torch.Generator().manual_seed(5)

    def tune(name: str, value: torch.Tensor) -> torch.Tensor:
        if value.dim() not in (2, 4):
            return value
        return value + 0.2 * value.std() * torch.randn(value.shape, generator=generator)

    def prune(name: str, value: torch.Tensor) -> torch.Tensor | None:
        if name == "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight":
            return None
        if name == "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight":
            return torch.zeros(value.shape[0] * 2, value.shape[1])
        return value

    return {
        "tuned": rewrite_unet(tiny_sd, folder / "tuned", tune),
        "reseeded": build_tiny_sd(folder / "reseeded", seed=1),
        "pruned": rewrite_unet(tiny_sd, folder / "pruned", prune),
    }


def test_similarity_is_one_for_one_subspace_and_near_zero_for_random_ones() -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.linalg.qr(torch.randn(200, 20, generator=generator)).Q
    b = torch.linalg.qr(torch.randn(200, 30, generator=generator)).Q
    rotated = a @ torch.linalg.qr(torch.randn(20, 20, generator=generator)).Q  # same span, other basis
    assert subspace_similarity(a, rotated) == pytest.approx(1.0, abs=1e-5)
    assert subspace_similarity(a, b) < 0.05
    assert subspace_similarity(a, torch.eye(200)) == 1.0  # the whole space: projecting changes nothing
    complement = torch.linalg.qr(torch.eye(200) - a @ a.T).Q[:, 20:40]
    assert subspace_similarity(a, complement) == 0.0


def test_principal_subspaces_hold_the_energy_asked_for() -> None:
    weight = torch.diag(torch.tensor([10.0, 3.0, 1.0, 0.1])) @ torch.linalg.qr(torch.randn(4, 4)).Q
    left, right = principal_subspaces(weight, 0.9)
    assert left.shape == (4, 1) and right.shape == (4, 1)  # 100 / 110.01 >= 0.9
    assert principal_subspaces(weight, 0.99)[0].shape[1] == 2
    assert principal_subspaces(weight, 1.0)[0].shape[1] == 4


def test_the_direct_rotation_turns_one_subspace_onto_the_other_and_fixes_the_rest() -> None:
    """In R^3, from the line through e1 to the line at angle θ in the e1-e2 plane: the rotation by θ in that
    plane, e3 fixed (Davis & Kahan's direct rotation is the smallest rotation doing it)."""
    theta = 0.4
    source = torch.tensor([[1.0], [0.0], [0.0]])
    target = torch.tensor([[math.cos(theta)], [math.sin(theta)], [0.0]])
    expected = torch.tensor(
        [[math.cos(theta), -math.sin(theta), 0.0], [math.sin(theta), math.cos(theta), 0.0], [0.0, 0.0, 1.0]]
    )
    turn = direct_rotation(source, target)
    torch.testing.assert_close(rotate(torch.eye(3), turn, (torch.eye(3), torch.zeros(3, 3))), expected)
    same = direct_rotation(source, -source)  # one line, the other orientation: nothing to turn
    torch.testing.assert_close(rotate(torch.eye(3), same, same), torch.eye(3))


def transfer(adapter: Path, source: Path, target: Path, out: Path, *options: str):
    return invoke("transfer", str(adapter), str(out), "--from", str(source), "--to", str(target), *options)


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr", "dora"])
def test_the_carried_update_is_the_projection_onto_the_targets_subspaces(
    kind: str, trained_adapters: dict[str, Path], tiny_sd: Path, targets: dict[str, Path], tmp_path: Path
) -> None:
    """Checked against the definition of an orthogonal projection, with subspaces computed here: the carried
    update lies in span(U) x span(V) of the target weight, and what it leaves out is orthogonal to that span."""
    out = tmp_path / "carried.safetensors"
    options = ("--method", "project", "--energy", "1", "--threshold", "0")
    result = transfer(trained_adapters[kind], tiny_sd, targets["tuned"], out, *options)
    assert result.returncode == 0, result.stderr
    source, target = base_weights(tiny_sd), base_weights(targets["tuned"])
    original, carried = read_for_base(trained_adapters[kind], tiny_sd).tensors, read_for_base(out, targets["tuned"])
    assert carried.algorithm.name == "lora" and carried.tensors.keys() == original.keys()
    for key in list(original)[::7]:
        weight = source.read_weight(key).float()
        update = (merged_weight(weight, original[key]) - weight).flatten(1)
        moved = delta_weight(carried.tensors[key], weight.shape).flatten(1)
        u, s, vh = torch.linalg.svd(target.read_weight(key).float().flatten(1), full_matrices=False)
        k = int((torch.cumsum(s**2, 0) / (s**2).sum() < 0.99 - 1e-6).sum()) + 1
        left, right = u[:, :k], vh[:k].T
        scale = update.abs().max()
        torch.testing.assert_close(left @ left.T @ moved @ right @ right.T, moved, atol=1e-3 * scale, rtol=0)
        torch.testing.assert_close(left.T @ (update - moved) @ right, torch.zeros(k, k), atol=1e-3 * scale, rtol=0)


def test_a_rotated_update_keeps_its_size_and_rank_and_is_the_same_on_the_same_base(
    trained_adapters: dict[str, Path], tiny_sd: Path, targets: dict[str, Path], tmp_path: Path
) -> None:
    adapter = trained_adapters["lora"]
    original = read_for_base(adapter, tiny_sd).tensors
    for target, name in ((tiny_sd, "same"), (targets["tuned"], "tuned")):
        out = tmp_path / f"{name}.safetensors"
        result = transfer(adapter, tiny_sd, target, out, "--threshold", "0")
        assert result.returncode == 0, result.stderr
        carried = read_for_base(out, target).tensors
        for key, named in original.items():
            update = delta_weight(named, base_weights(tiny_sd).tensors[key[0]][key[1] + ".weight"].shape)
            moved = delta_weight(carried[key], update.shape)
            assert carried[key]["lora_down.weight"].shape == named["lora_down.weight"].shape
            if name == "same":
                torch.testing.assert_close(moved, update, rtol=1e-4, atol=1e-4 * update.abs().max().item())
            else:
                torch.testing.assert_close(moved.norm(), update.norm(), rtol=1e-4, atol=0.0)


def test_a_fine_tune_is_similar_and_an_unrelated_base_is_not(
    trained_adapters: dict[str, Path], tiny_sd: Path, targets: dict[str, Path], tmp_path: Path
) -> None:
    adapter = trained_adapters["locon"]
    tuned = invoke("info", str(adapter), "--base", str(targets["tuned"]), "--json")  # the recorded base: tiny_sd
    assert tuned.returncode == 0, tuned.stderr
    report = json.loads(tuned.stdout)
    assert report["fit"]["same_base_as_training"] is False  # same headers, other weights
    carried = report["carry_over"]
    assert carried["from"] == str(tiny_sd) and carried["mean_similarity"] > 0.8
    assert carried["similar_layers"] + len(carried["dissimilar_layers"]) == report["layers"]
    unrelated = invoke("info", str(adapter), "--base", str(targets["reseeded"]), "--from", str(tiny_sd))
    assert unrelated.returncode == 0, unrelated.stderr
    line = next(line for line in unrelated.stdout.splitlines() if line.startswith("carry-over"))
    assert line.split()[1] == "0" and "dissimilar layers" in line
    refused = transfer(adapter, tiny_sd, targets["reseeded"], tmp_path / "no.safetensors")
    assert refused.returncode == 2 and not (tmp_path / "no.safetensors").exists()
    assert "no layer reaches similarity 0.5" in refused.stderr.strip().splitlines()[-1]


def test_missing_and_reshaped_layers_are_listed_and_the_file_records_both_bases(
    trained_adapters: dict[str, Path], tiny_sd: Path, targets: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "carried.safetensors"
    result = transfer(trained_adapters["lora"], tiny_sd, targets["pruned"], out)
    assert result.returncode == 0, result.stderr
    attention = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    assert f"skipped {attention}.to_q: the target has no such layer" in result.stdout
    assert f"skipped {attention}.to_k: the target's layer has another shape" in result.stdout
    with safe_open(str(out), "pt") as handle:
        metadata = handle.metadata()
    record = json.loads(metadata["lora_cli.transferred_from"])
    fingerprints = {"source": fingerprint(tiny_sd), "target": fingerprint(targets["pruned"])}
    assert record["source_fingerprint"] == fingerprints["source"] != fingerprints["target"]
    assert metadata["lora_cli.base_fingerprint"] == record["target_fingerprint"] == fingerprints["target"]
    assert record["skipped_layers"] == 2 and metadata["lora_cli.base_model"] == str(targets["pruned"])


def test_bases_of_two_architectures_are_refused(trained_adapters, tiny_sd: Path, tiny_sdxl: Path, tmp_path) -> None:
    result = transfer(trained_adapters["lora"], tiny_sd, tiny_sdxl, tmp_path / "out.safetensors")
    assert result.returncode == 2 and "two bases of one architecture" in result.stderr.strip().splitlines()[-1]


def test_a_fine_tune_has_its_own_fingerprint(tiny_sd: Path, targets: dict[str, Path]) -> None:
    """Its headers are the base's byte for byte; the fingerprint (which keys caches and provenance) differs."""
    tuned = targets["tuned"]
    assert header(tiny_sd / UNET_FILE) == header(tuned / UNET_FILE)
    assert fingerprint(tuned) != fingerprint(tiny_sd) == fingerprint(tiny_sd)


def header(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(int.from_bytes(handle.read(8), "little"))


def fingerprint(base: Path) -> str:
    with open_base_source(str(base), "base") as source:
        return source.fingerprint()
