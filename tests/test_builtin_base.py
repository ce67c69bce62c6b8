"""The shipped shapes base, its judge, and a shortened quickstart run."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from lora_cli.config.schema import ModelSection
from lora_cli.errors import ModelLoadError
from lora_cli.models import load_base
from lora_cli.toy.evaluation import guidance_for, pair_accuracy
from lora_cli.toy.judge import Judge, procedural_accuracy
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def judge() -> Judge:
    return Judge.load()


def test_judge_reads_procedural_images(judge: Judge) -> None:
    assert procedural_accuracy(judge, per_pair=8, seed=123) >= 0.99


def test_builtin_base_draws_known_prompts_and_not_the_held_out_one(judge: Judge) -> None:
    base = load_base(ModelSection(path="builtin:shapes"))
    assert base.identity.source == "builtin:shapes"
    pipeline = base.architecture.build_pipeline(base)
    scores = pair_accuracy(pipeline, judge, [("red", "circle"), ("blue", "triangle"), ("yellow", "star")], 4, 0)
    assert scores["a red circle"] >= 0.75 and scores["a blue triangle"] >= 0.75
    assert scores["a yellow star"] <= 0.25


def test_builtin_dit_base_is_small_loads_as_sd3_and_draws_known_prompts_only(judge: Judge) -> None:
    from lora_cli.builtin import builtin_path

    stored = sum(path.stat().st_size for path in builtin_path("shapes-dit").rglob("*") if path.is_file())
    assert stored <= 10 * 2**20
    base = load_base(ModelSection(path="builtin:shapes-dit"))
    assert base.architecture.name == "stable-diffusion-3" and base.pipeline_extras["text_tokens"] == 16
    pipeline = base.architecture.build_pipeline(base)
    pairs = [("red", "circle"), ("blue", "triangle"), ("yellow", "star")]
    scores = pair_accuracy(pipeline, judge, pairs, 4, 0, text_tokens=16, guidance=guidance_for("builtin:shapes-dit"))
    assert scores["a red circle"] >= 0.75 and scores["a blue triangle"] >= 0.75
    assert scores["a yellow star"] <= 0.25


def test_unknown_builtin_is_a_one_line_error() -> None:
    with pytest.raises(ModelLoadError, match="no built-in model `squares`; available: shapes, shapes-dit"):
        load_base(ModelSection(path="builtin:squares"))


@pytest.mark.parametrize(
    ("preset", "adapter"), [("quickstart.yaml", "yellow-star"), ("quickstart-dit.yaml", "yellow-star-dit")]
)
def test_short_quickstart_writes_every_output(tmp_path: Path, preset: str, adapter: str) -> None:
    out = tmp_path / "quickstart"
    result = run_cli(
        str(ROOT / "presets" / preset),
        *("--set", "train.steps=3", "--set", "prior.images_per_prompt=1", "--set", "sample.steps=3"),
        *("--set", f"output.dir={out}", "--no-progress"),
    )
    assert result.returncode == 0, result.stderr
    assert (out / f"{adapter}.safetensors").is_file()
    assert (out / "loss.png").is_file() and (out / "metrics.jsonl").is_file()
    grid = Image.open(out / "samples" / "before-after.png")
    assert grid.width > 2 * 96 and grid.height > 4 * 96  # two columns, four prompts
    prior = list((out / "prior").rglob("*.png"))
    assert len(prior) == 9
