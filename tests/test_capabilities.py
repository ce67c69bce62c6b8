"""The capability matrix, generated from the registries (`lora_cli.capabilities`): every architecture x adapter
algorithm x base source x command either works — checked by its behaviour — or is refused with the one line
that docs/capabilities.md states. Adapters are trained once per architecture, algorithm and base and shared by
the commands' cells."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from lora_cli.capabilities import Cell, builtin_architectures, cells, markdown
from tests.conftest import invoke, read_for_base, train_preset

# Run on one xdist worker: the cells share adapters trained once per module.
pytestmark = pytest.mark.xdist_group(name="capabilities")

ROOT = Path(__file__).resolve().parents[1]
DITS = ("flux", "pixart", "wan", "z-image", "qwen-image", "flux2", "hunyuan-video", "longcat-image")
NO_DIFFUSERS_LOADER = ("pixart", "longcat-image")  # diffusers 0.42 has no LoRA loader for their pipelines
TINY = {"stable-diffusion": "sd", "stable-diffusion-xl": "sdxl", "stable-diffusion-3": "sd3", **{d: d for d in DITS}}
VIDEO = ("wan", "hunyuan-video")  # trained on clips
ADAPTERS = {
    "lora": {"type": "lora"},
    "dora": {"type": "lora", "dora": True},
    "locon": {"type": "locon", "conv_rank": 2, "conv_alpha": 1},
    "loha": {"type": "loha"},
    "lokr": {"type": "lokr"},
}
CELLS = cells()


def test_the_docs_table_is_generated_from_the_registries() -> None:
    assert (ROOT / "docs" / "capabilities.md").read_text(encoding="utf-8") == markdown(), (
        "docs/capabilities.md is stale: python -m lora_cli.capabilities > docs/capabilities.md"
    )


class World:
    """Bases, trained adapters and merged models, made on first use and shared by every cell."""

    def __init__(self, tiny_base, shapes_data: Path, clips: Path, folder: Path) -> None:
        self.tiny_base, self.shapes_data, self.clips, self.folder = tiny_base, shapes_data, clips, folder
        self.made: dict[tuple, object] = {}

    def once(self, key: tuple, make):
        if key not in self.made:
            self.made[key] = make()
        return self.made[key]

    def folder_base(self, cell: Cell) -> Path:
        return self.tiny_base(TINY[cell.architecture.name])

    def base(self, cell: Cell) -> str:
        """The base as the cell's source gives it."""
        folder = self.folder_base(cell)
        if cell.source == "builtin":
            return builtin_architectures()[cell.architecture.name]
        if cell.source == "folder":
            return str(folder)
        if not cell.architecture.single_file:  # what such users hold: the model's weights in one file
            return str(folder / "transformer" / "diffusion_pytorch_model.safetensors")
        return str(self.once(("single", folder), lambda: self._single_file(folder)))

    def _single_file(self, folder: Path) -> Path:
        from lora_cli.models.single_file_writer import write_single_file

        out = self.folder / f"{folder.name}.safetensors"
        write_single_file(folder, out, {})
        return out

    def preset(self, cell: Cell, base: str, steps: int = 2) -> dict:
        video = cell.architecture.name in VIDEO
        data = {"folder": str(self.clips), "frames": 5} if video else {"folder": str(self.shapes_data)}
        model = {"path": base}
        if cell.architecture.denoiser_name == "transformer":
            model["max_text_tokens"] = 16
        if cell.source == "single file":
            model["config"] = str(self.folder_base(cell))
        name = f"{cell.architecture.name}-{cell.variant.name}-{cell.source.replace(' ', '_')}"
        return {
            "model": model,
            "data": {**data, "resolution": 32},
            "adapter": {"rank": 4, "alpha": 2, "targets": "full", **ADAPTERS[cell.variant.name]},
            "train": {"steps": steps, "learning_rate": 3e-2, "batch_size": 2},
            "output": {"dir": str(self.folder / "runs" / name), "name": name},
        }

    def adapter(self, cell: Cell) -> Path:
        """The adapter trained on the cell's base (single files share the folder's: the same weights)."""
        source = "folder" if cell.source == "single file" else cell.source
        key = ("adapter", cell.architecture.name, cell.variant.name, source)
        trained_on = Cell(cell.architecture, cell.variant, source, "train")
        return self.once(key, lambda: train_preset(self.preset(trained_on, self.base(trained_on)), "matrix"))

    def merged(self, cell: Cell) -> Path:
        def merge() -> Path:
            out = self.folder / "merged" / cell.id
            if cell.source == "single file":
                out = out.with_suffix(".safetensors")
            result = invoke("merge", self.base(cell), str(self.adapter(cell)), str(out))
            assert result.returncode == 0, result.stderr
            return out

        return self.once(("merged", cell.architecture.name, cell.variant.name, cell.source), merge)

    def diffusers_pipeline(self, cell: Cell):
        from tests.test_interop import diffusers_pipeline

        return self.once(("diffusers", cell.architecture.name), lambda: diffusers_pipeline(self.folder_base(cell)))


@pytest.fixture(scope="module")
def world(tiny_base, shapes_data: Path, clips: Path, tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(tiny_base, shapes_data, clips, tmp_path_factory.mktemp("matrix"))


@pytest.mark.parametrize("cell", CELLS, ids=[cell.id for cell in CELLS])
def test_capability(cell: Cell, world: World, tmp_path: Path) -> None:
    if cell.refusal is not None:
        return check_refused(cell, world, tmp_path)
    globals()[f"check_{cell.command.replace(' ', '_')}"](cell, world, tmp_path)


def run(cell: Cell, world: World, tmp_path: Path):
    """The cell's command, as a user runs it, against the cell's base."""
    base, out = world.base(cell), tmp_path / "out.safetensors"
    adapter = str(world.adapter(cell)) if cell.command != "train" else ""
    if cell.command in ("train", "plan"):
        preset = tmp_path / "preset.yaml"
        preset.write_text(yaml.safe_dump(world.preset(cell, base)))
        return invoke("train", str(preset), *(["--plan"] if cell.command == "plan" else ["--no-progress"]))
    commands = {
        "info": ("info", adapter, "--base", base, "--json"),
        "convert to diffusers": ("convert", adapter, str(out), "--to", "diffusers", "--base", base),
        "convert to kohya": ("convert", adapter, str(out), "--to", "kohya", "--base", base),
        "merge": ("merge", base, adapter, str(tmp_path / "merged")),
        "sample": ("sample", "--base", base, "--adapter", adapter, *sample_options(cell, world, tmp_path / "samples")),
        "extract": ("lowrank", base, base, str(out), "--rank", "2"),
        "resize": ("lowrank", adapter, str(out), "--rank", "2", "--base", base),
        "transfer": ("transfer", adapter, str(out), "--from", base, "--to", base, "--energy", "1"),
    }  # fmt: skip
    module, *args = commands[cell.command]
    entry = {"extract": "extract_main", "resize": "resize_main"}.get(cell.command, "main")
    return invoke(module, *args, entry=entry)


def sample_options(cell: Cell, world: World, out: Path) -> list[str]:
    # two steps: Qwen-Image's scheduler (its terminal-sigma stretch) cannot draw in one
    options = ["--prompt", "a red circle", "--steps", "2", "--size", "32", "--out", str(out)]
    if cell.source == "single file":
        options += ["--config", str(world.folder_base(cell))]
    if cell.architecture.name in VIDEO:
        options += ["--frames", "1"]
    return options


def check_refused(cell: Cell, world: World, tmp_path: Path) -> None:
    result = run(cell, world, tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr[-500:])
    assert lines and cell.refusal in lines[-1] and len(lines[-1]) < 400, result.stderr[-500:]
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "merged").exists()


def check_train(cell: Cell, world: World, tmp_path: Path) -> None:
    adapter = world.adapter(cell)
    metrics = [json.loads(line) for line in (adapter.parent / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(np.isfinite(record["loss"]) for record in metrics)
    assert read_for_base(adapter, world.base(cell)).tensors  # fits the base it was trained on


def check_info(cell: Cell, world: World, tmp_path: Path) -> None:
    result = run(cell, world, tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["fit"]["fits"] and report["fit"]["matched_layers"] == report["layers"] > 0
    assert report["nonfinite_tensor"] is None
    assert report["fit"]["same_base_as_training"] is (cell.source != "single file")


def same_layers(first: Path, second: Path, base: str) -> None:
    """Two files hold the same layers, tensor for tensor (DoRA magnitudes in either file convention)."""
    one, two = read_for_base(first, base).tensors, read_for_base(second, base).tensors
    assert one.keys() == two.keys()
    for key, named in one.items():
        assert named.keys() == two[key].keys(), key
        for name, value in named.items():
            assert torch.equal(value.reshape(-1), two[key][name].reshape(-1)), (key, name)


def check_convert_to_diffusers(cell: Cell, world: World, tmp_path: Path) -> None:
    result = run(cell, world, tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out.safetensors"
    assert all(not key.startswith("lora_") for key in load_file(str(out)))
    same_layers(world.adapter(cell), out, world.base(cell))
    if cell.source == "folder" and cell.architecture.name not in NO_DIFFUSERS_LOADER:
        from tests.test_interop import assert_consumed

        pipe = world.diffusers_pipeline(cell)
        try:
            assert_consumed(pipe, out)
        finally:
            pipe.delete_adapters("judged")


def check_convert_to_kohya(cell: Cell, world: World, tmp_path: Path) -> None:
    result = run(cell, world, tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out.safetensors"
    assert all(key.startswith("lora_") for key in load_file(str(out)))
    same_layers(world.adapter(cell), out, world.base(cell))


def check_merge(cell: Cell, world: World, tmp_path: Path) -> None:
    """Merged weights equal base + delta, computed here from the adapter's own tensors."""
    from lora_cli.adapters.functional import merged_weight
    from tests.conftest import base_weights

    merged, base = world.merged(cell), world.base(cell)
    before, after = base_weights(base), base_weights(merged)
    layers = read_for_base(world.adapter(cell), base).tensors
    for key, named in sorted(layers.items())[:: max(1, len(layers) // 4)]:
        expected = merged_weight(before.read_weight(key), named)
        torch.testing.assert_close(after.read_weight(key).float(), expected, rtol=1e-5, atol=1e-6)
    untouched = next(k for k in before.module_shapes() if k not in layers)
    assert torch.equal(before.read_weight(untouched), after.read_weight(untouched))


def check_sample(cell: Cell, world: World, tmp_path: Path) -> None:
    """lora-sample with the adapter draws what the merged model draws alone (same seed and settings)."""
    result = run(cell, world, tmp_path)
    assert result.returncode == 0, result.stderr
    merged = world.merged(cell)
    tokens = ["--text-tokens", "16"] if cell.architecture.denoiser_name == "transformer" else []  # as trained
    again = invoke("sample", "--base", str(merged), *sample_options(cell, world, tmp_path / "merged-samples"), *tokens)
    assert again.returncode == 0, again.stderr
    ours = np.asarray(Image.open(next((tmp_path / "samples").glob("000-*.png"))), dtype=np.int16)
    theirs = np.asarray(Image.open(next((tmp_path / "merged-samples").glob("000-*.png"))), dtype=np.int16)
    assert np.abs(ours - theirs).max() <= 2


def check_extract(cell: Cell, world: World, tmp_path: Path) -> None:
    """A LoRA extracted from (base, merged) reproduces merged - base in every layer the adapter changed."""
    from lora_cli.adapters.functional import delta_weight
    from lora_cli.toolbox.lowrank import extract
    from tests.conftest import base_weights

    base, merged = world.base(cell), world.merged(cell)
    reports = extract(base, str(merged), tmp_path / "extracted.safetensors", rank=None, energy=1.0)
    assert reports and min(report.energy for report in reports) > 0.9999
    before, after = base_weights(base), base_weights(merged)
    extracted = read_for_base(tmp_path / "extracted.safetensors", base).tensors
    adapted = read_for_base(world.adapter(cell), base).tensors
    assert extracted and set(extracted) <= set(adapted)
    for key in set(adapted) - set(extracted):  # layers two steps left at zero (no gradient reached them; DoRA
        # re-normalises them, within rounding: the last Qwen-Image block's text stream feeds nothing)
        torch.testing.assert_close(after.read_weight(key), before.read_weight(key), rtol=1e-5, atol=1e-7, msg=key)
    for key, named in list(extracted.items())[:3]:
        actual = after.read_weight(key).float() - before.read_weight(key).float()
        torch.testing.assert_close(delta_weight(named, actual.shape), actual, rtol=1e-3, atol=1e-5, msg=key)
    refused = run(cell, world, tmp_path)  # a model against itself: nothing to extract, one line
    assert refused.returncode == 2 and "nothing to extract" in refused.stderr.strip().splitlines()[-1]


def check_resize(cell: Cell, world: World, tmp_path: Path) -> None:
    """Resized at full energy, any algorithm becomes a plain LoRA with the same update."""
    from lora_cli.adapters.functional import delta_weight, merged_weight
    from lora_cli.toolbox.lowrank import resize
    from tests.conftest import base_weights

    base = world.base(cell)
    adapter = world.adapter(cell)
    resize(adapter, tmp_path / "resized.safetensors", rank=None, energy=1.0, base=base)
    weights = base_weights(base)
    original, resized = read_for_base(adapter, base).tensors, read_for_base(tmp_path / "resized.safetensors", base)
    assert resized.algorithm.name == "lora" and resized.tensors.keys() == original.keys()
    for key, named in list(original.items())[:3]:
        weight = weights.read_weight(key).float()
        expected = merged_weight(weight, named) - weight
        torch.testing.assert_close(delta_weight(resized.tensors[key], weight.shape), expected, rtol=1e-3, atol=1e-5)
    small = run(cell, world, tmp_path)
    assert small.returncode == 0 and "rank 2" in small.stdout, small.stderr


def check_transfer(cell: Cell, world: World, tmp_path: Path) -> None:
    """Carried to its own base (the rotation is the identity), any algorithm becomes a plain LoRA with the same
    update, recorded as carried from and to that base."""
    from lora_cli.adapters.functional import merged_weight
    from tests.conftest import base_weights

    result = run(cell, world, tmp_path)
    assert result.returncode == 0, result.stderr
    base, out = world.base(cell), tmp_path / "out.safetensors"
    weights = base_weights(base)
    original, carried = read_for_base(world.adapter(cell), base).tensors, read_for_base(out, base)
    assert carried.algorithm.name == "lora" and carried.tensors.keys() == original.keys()
    for key, named in list(original.items())[:3]:
        weight = weights.read_weight(key).float()
        torch.testing.assert_close(
            merged_weight(weight, carried.tensors[key]), merged_weight(weight, named), rtol=1e-4, atol=1e-5
        )
    record = json.loads(carried.metadata["lora_cli.transferred_from"])
    assert record["source_fingerprint"] == record["target_fingerprint"] == carried.metadata["lora_cli.base_fingerprint"]


def check_plan(cell: Cell, world: World, tmp_path: Path) -> None:
    result = run(cell, world, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "peak" in result.stdout.lower()


def test_every_command_has_a_check() -> None:
    for cell in CELLS:
        assert f"check_{cell.command.replace(' ', '_')}" in globals(), cell.command


def test_the_readme_links_the_table() -> None:
    assert "docs/capabilities.md" in (ROOT / "README.md").read_text(encoding="utf-8")
