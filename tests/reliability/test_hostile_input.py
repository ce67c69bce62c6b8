"""Hostile and broken inputs: each gives its one-line error and exit code, runs no code, damages no output."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_cli.models.single_file_writer import write_single_file
from tests.conftest import run_cli, run_command


class RunsCode:
    """Unpickling this runs a shell command: what a malicious .ckpt/.pt does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_one_line_error(result: subprocess.CompletedProcess, message: str, code: int = 2) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, last


@pytest.fixture(scope="module")
def lora_file(trained_adapters) -> Path:
    return trained_adapters["lora"]


def test_pickle_files_are_refused_then_read_without_running_code(write_preset, tiny_sd, tmp_path) -> None:
    single = tmp_path / "base.safetensors"
    write_single_file(tiny_sd, single, {})
    checkpoint = tmp_path / "base.ckpt"
    torch.save({"state_dict": load_file(single)}, checkpoint)
    preset = write_preset(model={"path": str(checkpoint), "config": str(tiny_sd)}, train={"steps": 1})
    assert_one_line_error(run_cli(str(preset), "--no-progress"), "pass --allow-pickle")
    assert not (tmp_path / "run").exists()
    trained = run_cli(str(preset), "--no-progress", "--allow-pickle")
    assert trained.returncode == 0, trained.stderr
    assert (tmp_path / "run" / "lora.safetensors").is_file()

    marker = tmp_path / "code-ran"
    hostile = tmp_path / "hostile.ckpt"
    hostile.write_bytes(pickle.dumps({"state_dict": RunsCode(marker)}))
    preset = write_preset(model={"path": str(hostile), "config": str(tiny_sd)}, output={"dir": str(tmp_path / "h")})
    assert_one_line_error(run_cli(str(preset), "--no-progress", "--allow-pickle"), "cannot be read as a plain tensor")
    sampled = run_command("sample", "--base", str(hostile), "--prompt", "a", "--allow-pickle", "--out", str(tmp_path))
    assert_one_line_error(sampled, "cannot be read as a plain tensor")
    assert not marker.exists(), "unpickling ran code"


def test_damaged_safetensors_headers_and_metadata(tiny_sd, lora_file, tmp_path) -> None:
    oversized = tmp_path / "oversized.safetensors"
    oversized.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 10) + b"\xff\xfe not json")
    lying = tmp_path / "lying-offsets.safetensors"  # a 2x2 float32 tensor that claims 4 bytes
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 4]}})
    lying.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * 4)
    from lora_cli.errors import ModelLoadError
    from lora_cli.io.safetensors_stream import stream_rewrite

    with pytest.raises(ModelLoadError, match="entry w has impossible offsets or shape"):
        stream_rewrite(lying, tmp_path / "out.safetensors", lambda n, t: t, lambda n: False, {}, ModelLoadError)
    assert not (tmp_path / "out.safetensors").exists()
    wrong_metadata = tmp_path / "wrong-metadata.safetensors"
    header = json.dumps(
        {"__metadata__": {"lora_cli.rank": 4}, "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    )
    wrong_metadata.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * 4)
    out = tmp_path / "samples"
    for path, message in [
        (oversized, "header length"),
        (garbage, "damaged safetensors header"),
        (wrong_metadata, "metadata must map strings to strings"),
    ]:
        assert_one_line_error(run_command("info", str(path)), message)
        sampled = run_command(
            "sample", "--base", str(tiny_sd), "--adapter", str(path), "--prompt", "a", "--out", str(out)
        )
        assert_one_line_error(sampled, message)
    assert not (out / "grid.png").exists()


def test_adapters_that_do_not_fit_the_base(tiny_sd, lora_file, tmp_path) -> None:
    stray = tmp_path / "stray.safetensors"
    save_file(
        {
            "lora_unet_nowhere.lora_down.weight": torch.zeros(2, 8),
            "lora_unet_nowhere.lora_up.weight": torch.zeros(8, 2),
        },
        stray,
    )
    wrong_shape = tmp_path / "wrong-shape.safetensors"
    tensors = load_file(lora_file)
    key = next(k for k in tensors if k.endswith("lora_down.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 3)
    save_file(tensors, wrong_shape)
    for adapter, message in [
        (stray, "none of its 1 layers matches this stable-diffusion base"),
        (wrong_shape, "does not fit this base"),
    ]:
        sampled = run_command(
            "sample", "--base", str(tiny_sd), "--adapter", str(adapter), "--prompt", "a", "--out", str(tmp_path / "s")
        )
        assert_one_line_error(sampled, message)
        merged = run_command("merge", str(tiny_sd), str(adapter), str(tmp_path / "merged"))
        assert merged.returncode == 2 and "Traceback" not in merged.stderr, merged.stderr
    assert not (tmp_path / "merged").exists() and not (tmp_path / "s" / "grid.png").exists()


def test_existing_outputs_are_never_damaged(write_preset, tiny_sd, lora_file, tmp_path) -> None:
    preset = write_preset(train={"steps": 1})
    assert run_cli(str(preset), "--no-progress").returncode == 0
    adapter = tmp_path / "run" / "lora.safetensors"
    before = digest(adapter)
    assert_one_line_error(run_cli(str(preset), "--no-progress"), "already holds a run")
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"precious")
    assert_one_line_error(run_command("merge", str(tiny_sd), str(lora_file), str(existing)), "already exists")
    assert_one_line_error(run_command("convert", str(lora_file), str(existing), "--to", "diffusers"), "exists")
    assert digest(adapter) == before and existing.read_bytes() == b"precious"


def test_paths_are_never_run_by_a_shell(write_preset, tmp_path) -> None:
    marker = tmp_path / "shell-ran"
    hostile = f"$(touch {marker}); `touch {marker}` | touch {marker}"
    preset = write_preset(data={"folder": hostile}, output={"dir": str(tmp_path / f"out; touch {marker}"), "name": "x"})
    result = subprocess.run(
        [sys.executable, "-c", "from lora_cli.cli.train import main; main()", str(preset), "--no-progress"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert_one_line_error(result, "dataset folder does not exist")
    assert not marker.exists()


def test_symlink_loops_in_a_dataset_do_not_hang_the_scan(shapes_data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    for source in sorted(shapes_data.iterdir())[:10]:
        (folder / source.name).write_bytes(source.read_bytes())
    (folder / "5_loop").symlink_to(folder, target_is_directory=True)  # a repeat folder that contains itself
    (folder / "self.png").symlink_to(folder / "self.png")  # a link to itself
    (folder / "a").symlink_to(folder / "b")
    (folder / "b").symlink_to(folder / "a")
    result = run_command("check_dataset", str(folder), "--json")
    assert result.returncode in (0, 1), result.stderr
    report = json.loads(result.stdout)
    assert report["images"] >= 10
