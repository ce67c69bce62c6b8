"""Video bases (Wan 2.x, HunyuanVideo): clips as video files or frame folders, training, sampling, merging."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console
from safetensors.torch import load_file

from datasets_tools.clips import check_clips
from lora_cli.sampling.run import SampleRequest, run_sampling
from lora_cli.toolbox.merge import merge_adapters
from tests.conftest import fixed_batch_losses, run_command, train_preset

FRAMES = 5  # the causal video VAEs take 4k+1 frames
VIDEO_BASES = ("wan", "hunyuan-video")


@pytest.fixture(scope="module")
def tiny_wan(tiny_base) -> Path:
    return tiny_base("wan")


def wan_preset(base: Path, data: Path, out: Path, **train) -> dict:
    return {
        "model": {"path": str(base), "max_text_tokens": 32},
        "data": {"folder": str(data), "resolution": 64, "frames": FRAMES},
        "adapter": {"rank": 4, "alpha": 4, "targets": "attention_ff"},
        "train": {"steps": 3, "learning_rate": 3e-2, "batch_size": 2, **train},
        "output": {"dir": str(out), "name": "wan"},
    }


@pytest.fixture(scope="module")
def wan_adapter(tiny_wan: Path, clips: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    raw = wan_preset(tiny_wan, clips, tmp_path_factory.mktemp("wan-lora"))
    return train_preset(raw, "wan")


@pytest.fixture(scope="module", params=VIDEO_BASES)
def video_base(request, tiny_base, clips: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(tiny base, an attention_ff LoRA trained on the clips) per video architecture."""
    base = tiny_base(request.param)
    raw = wan_preset(base, clips, tmp_path_factory.mktemp(f"{request.param}-lora"))
    return base, train_preset(raw, "wan")


def test_clip_check_reads_both_kinds_and_reports_problems(clips: Path, tmp_path: Path) -> None:
    report = check_clips(clips, FRAMES, None, [".txt"])
    kinds = {item.image.is_dir() for item in report.items}
    assert len(report.items) == 6 and kinds == {True, False} and not report.findings
    broken = tmp_path / "broken"
    shutil.copytree(clips, broken)
    (broken / "clip00.mp4").write_bytes(b"not a video")
    (broken / "clip02.txt").unlink()
    shutil.rmtree(broken / "clip01")
    (broken / "clip01").mkdir()
    report = check_clips(broken, FRAMES, None, [".txt"])
    codes = {(Path(f.file).name, f.code) for f in report.findings}
    assert codes == {("clip00.mp4", "unreadable-clip"), ("clip02.mp4", "missing-caption"),
                     ("clip01", "unreadable-clip")}  # fmt: skip
    short = check_clips(clips, 9, 8.0, [".txt"])  # 9 frames at 16 fps are 4 at 8 fps
    assert {f.code for f in short.findings} == {"short-clip", "no-clips"}


@pytest.mark.parametrize("name", VIDEO_BASES)
def test_video_training_lowers_the_loss_on_a_fixed_clip(name: str, write_preset, tiny_base, clips: Path) -> None:
    preset = write_preset(model={"path": str(tiny_base(name)), "max_text_tokens": 32}, data={"frames": FRAMES})
    overrides = ["train.learning_rate=1e-2", "adapter.targets=full"]
    before, after = fixed_batch_losses(preset, overrides, clips, sample="clip01")
    assert after < 0.85 * before, (before, after)


def test_video_adapter_samples_merges_and_loads_in_diffusers(video_base, tmp_path: Path) -> None:
    """Wan and HunyuanVideo (whose pipeline returns PIL frames rather than float arrays)."""
    from diffusers import DiffusionPipeline

    tiny_wan, wan_adapter = video_base
    keys = load_file(wan_adapter).keys()
    assert all(key.startswith("transformer.") for key in keys)

    def strip(base: Path, out: str, adapters=()) -> np.ndarray:
        # T5 cut to the 32 tokens the adapter was trained with, as lora-sample does by itself for the adapter
        request = SampleRequest(base=str(base), out=tmp_path / out, prompts=["a red circle moving right"], steps=2,
                                size=64, seed=3, frames=FRAMES, adapters=list(adapters), guidance_scale=7.5,
                                text_tokens=32)  # fmt: skip
        return np.asarray(Image.open(run_sampling(request, Console(quiet=True))[0]), dtype=np.int16)

    ours, base = strip(tiny_wan, "ours", [(wan_adapter, 1.0)]), strip(tiny_wan, "base")
    assert ours.shape == (64, 64 * FRAMES, 3) and np.abs(ours - base).max() > 10
    merged = tmp_path / "merged"
    merge_adapters(tiny_wan, [(wan_adapter, 1.0)], merged)
    assert np.abs(strip(merged, "merged") - ours).max() <= 1

    import torch

    pipe = DiffusionPipeline.from_pretrained(tiny_wan)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(wan_adapter))
    generator = torch.Generator().manual_seed(3)
    video = pipe("a red circle moving right", num_inference_steps=2, height=64, width=64, num_frames=FRAMES,
                 guidance_scale=7.5, generator=generator, max_sequence_length=32,
                 output_type="np").frames[0]  # fmt: skip
    theirs = np.concatenate(list((np.clip(video, 0, 1) * 255).round().astype(np.int16)), axis=1)
    assert np.abs(ours - theirs).max() <= 1, np.abs(ours - theirs).max()


def test_wan_cached_latents_and_cli_sample(tiny_wan: Path, clips: Path, wan_adapter: Path, tmp_path: Path) -> None:
    import yaml

    preset = tmp_path / "wan.yaml"
    raw = wan_preset(tiny_wan, clips, tmp_path / "run")
    raw["cache"] = {"latents": True, "text_embeddings": True}
    preset.write_text(yaml.safe_dump(raw))
    trained = run_command("train", str(preset), "--no-progress")
    assert trained.returncode == 0, trained.stderr
    assert len(list((tmp_path / "run" / "cache" / "latents").rglob("*.safetensors"))) == 6
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    sampled = run_command("sample", "--preset", str(preset), "--adapter", str(wan_adapter), "--prompt", "a red circle",
                          "--steps", "2", "--out", str(tmp_path / "s"))  # fmt: skip
    assert sampled.returncode == 0, sampled.stderr
    assert Image.open(next((tmp_path / "s").glob("000-*.png"))).size == (64 * FRAMES, 64)
