"""Careless but plausible settings: each is refused before anything is trained, or handled in a way the run
says in one line."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from tests.conftest import invoke


def test_a_batch_the_data_cannot_fill_is_refused_unless_allowed(write_preset, tmp_path: Path) -> None:
    preset = write_preset(train={"steps": 1, "batch_size": 8})  # 6 images
    refused = invoke("train", str(preset), "--no-progress")
    assert refused.returncode == 2
    line = refused.stderr.strip().splitlines()[-1]
    assert "train.batch_size: 8 needs 8 samples per batch but" in line and "gives 6" in line
    assert "train.allow_short_batches: true" in line and not (tmp_path / "run").exists()
    allowed = invoke("train", str(preset), "--no-progress", "--set", "train.allow_short_batches=true")
    assert allowed.returncode == 0, allowed.stderr[-500:]


def test_fp16_autocast_is_refused_on_the_cpu(write_preset) -> None:
    result = invoke("train", str(write_preset(train={"steps": 1, "mixed_precision": "fp16"})), "--no-progress")
    assert result.returncode == 2 and "fp16 needs a CUDA GPU" in result.stderr.strip().splitlines()[-1]


def test_a_rank_larger_than_the_layers_is_clamped_and_said(write_preset, tmp_path: Path) -> None:
    """The tiny UNet's widest attention layer is 64 wide: rank 100000 trains as its largest useful rank."""
    preset = write_preset(adapter={"rank": 100_000, "alpha": 100_000, "type": "locon"}, train={"steps": 1})
    result = invoke("train", str(preset), "--no-progress")
    assert result.returncode == 0, result.stderr[-500:]
    assert "adapter.rank 100000 is more than" in result.stderr and "largest useful rank" in result.stderr
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "run" / "lora.safetensors"))
    downs = {k: v for k, v in tensors.items() if k.endswith("lora_down.weight")}
    assert all(
        v.shape[0] <= min(tensors[k.replace("lora_down", "lora_up")].shape[0], v[0].numel()) for k, v in downs.items()
    )
    assert sum(v.numel() for v in tensors.values()) < 2_000_000  # not the 582M a literal rank would make
    alphas = {k: float(v) for k, v in tensors.items() if k.endswith(".alpha")}
    ranks = {k.replace(".lora_down.weight", ".alpha"): v.shape[0] for k, v in downs.items()}
    assert all(abs(alphas[k] / ranks[k] - 1.0) < 1e-6 for k in alphas)  # the alpha/rank scale is kept


def test_caption_lengths_are_counted_with_the_bases_tokenizer_or_estimated(tiny_sd: Path, tmp_path: Path) -> None:
    for index in range(6):
        Image.new("RGB", (64, 64), (40 * index, 90, 200)).save(tmp_path / f"img{index}.png")
        (tmp_path / f"img{index}.txt").write_text(f"picture {index}")
    (tmp_path / "img0.txt").write_text("a red circle " * 40)  # 120 words
    estimated = json.loads(invoke("check_dataset", str(tmp_path), "--resolution", "64", "--json").stdout)
    long = [f for f in estimated["findings"] if f["code"] == "too-long"]
    assert len(long) == 1 and "about 122 tokens (estimated from words and punctuation" in long[0]["reason"]
    counted = json.loads(
        invoke("check_dataset", str(tmp_path), "--resolution", "64", "--json", "--base", str(tiny_sd)).stdout
    )
    long = [f for f in counted["findings"] if f["code"] == "too-long"]
    assert (
        len(long) == 1 and "counted by the base's tokenizer" in long[0]["reason"] and "about" not in long[0]["reason"]
    )
