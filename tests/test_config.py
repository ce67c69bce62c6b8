"""Preset loading: types as users write them, inheritance, overrides, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lora_cli.config import load_preset
from lora_cli.errors import PresetError
from tests.conftest import run_cli

MINIMAL = "model: {path: ./model}\ndata: {folder: images}\ntrain: {steps: 10}\n"


def write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_scientific_notation_is_a_float_and_alpha_defaults_to_rank(tmp_path: Path) -> None:
    preset = load_preset(write(tmp_path, MINIMAL + "adapter: {rank: 8}\n"), ["train.learning_rate=1e-4"])
    assert preset.train.learning_rate == pytest.approx(1e-4)
    assert preset.adapter.effective_alpha == 8.0
    preset = load_preset(write(tmp_path, MINIMAL.replace("steps: 10", "steps: 10, learning_rate: 3e-5")))
    assert preset.train.learning_rate == pytest.approx(3e-5)


def test_unquoted_no_is_the_mixed_precision_option_not_false(tmp_path: Path) -> None:
    """YAML 1.1 reads `no` as false; kohya users write `mixed_precision: no`."""
    preset = load_preset(write(tmp_path, MINIMAL.replace("steps: 10", "steps: 10, mixed_precision: no")))
    assert preset.train.mixed_precision == "no"
    assert load_preset(write(tmp_path, MINIMAL), ["train.mixed_precision=no"]).train.mixed_precision == "no"


def test_paths_resolve_against_the_preset_folder(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    preset = load_preset(write(tmp_path, MINIMAL))
    assert Path(preset.data.folder) == tmp_path / "images"
    assert Path(preset.model.path) == tmp_path / "model"
    hub = load_preset(write(tmp_path, MINIMAL.replace("./model", "org/some-model")))
    assert hub.model.path == "org/some-model"


def test_extends_merges_sections_and_overrides_win(tmp_path: Path) -> None:
    write(tmp_path, MINIMAL + "adapter: {rank: 16, dropout: 0.1}\n", "base.yaml")
    child = write(tmp_path, "extends: base.yaml\nadapter: {rank: 4}\n", "child.yaml")
    preset = load_preset(child, ["train.batch_size=3", "adapter.text_encoder=true"])
    assert (preset.adapter.rank, preset.adapter.dropout) == (4, 0.1)
    assert preset.train.batch_size == 3 and preset.adapter.text_encoder is True


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        (
            MINIMAL.replace("steps", "learning_rat: 1e-4, steps"),
            [],
            "unknown key `train.learning_rat` — did you mean `train.learning_rate`?",
        ),
        (MINIMAL + "adaptr: {rank: 4}\n", [], "unknown key `adaptr` — did you mean `adapter`?"),
        (MINIMAL, ["adapter.rank=0"], "`adapter.rank`: input should be greater than 0 (got 0)"),
        (MINIMAL, ["train.learning_rate=-1e-4"], "`train.learning_rate`: input should be greater than 0"),
        (MINIMAL, ["train.learning_rate=fast"], "`train.learning_rate`: input should be a valid number"),
        (MINIMAL, ["train.batch_size=2.5"], "`train.batch_size`: input should be a valid integer"),
        (MINIMAL, ["train.epochs=2"], "set exactly one of `train.steps` or `train.epochs`"),
        (MINIMAL, ["adapter.type=lorax"], "`adapter.type`: input should be 'lora'"),
        ("data: {folder: x}\ntrain: {steps: 1}\n", [], "missing required key `model`"),
        (MINIMAL, ["version=9"], "preset version 9 is newer than this lora-cli understands"),
        (MINIMAL, ["train.steps"], "expected section.key=value"),
        (
            MINIMAL + "cache: {text_embeddings: true}\nadapter: {text_encoder: true}\n",
            [],
            "cannot be used with",
        ),
        ("model: [1, 2\n", [], "invalid YAML (line"),
        (MINIMAL, ["adapter.targets=everything"], "preset `everything` is unknown; use one of attention"),
        (MINIMAL, ["adapter.type=loha", "adapter.dora=true"], "`adapter.dora` works with lora or locon, not loha"),
        (MINIMAL, ["adapter.type=lokr", "adapter.dropout=0.1"], "`adapter.dropout` is not available for lokr"),
        (
            MINIMAL,
            ["adapter.type=loha", "output.format=diffusers"],
            "`output.format: diffusers` cannot hold loha adapters; save it as `kohya`",
        ),
    ],
)
def test_invalid_presets_give_one_line_errors(tmp_path: Path, text: str, overrides: list[str], message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(PresetError) as caught:
        load_preset(path, overrides)
    assert message in str(caught.value)
    assert str(path) in str(caught.value) or "--set" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_extends_cycle_is_reported(tmp_path: Path) -> None:
    write(tmp_path, "extends: b.yaml\n", "a.yaml")
    write(tmp_path, "extends: a.yaml\n", "b.yaml")
    with pytest.raises(PresetError, match="cycle"):
        load_preset(tmp_path / "a.yaml")


def test_cli_reports_preset_errors_on_one_line_with_exit_code_2(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("steps", "learning_rat: 1e-4, steps"))
    result = run_cli(str(path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {path}: unknown key `train.learning_rat` — did you mean `train.learning_rate`?"
    ]
    missing = run_cli(str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "preset file not found" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_docs_describe_every_preset_key() -> None:
    from lora_cli.config.schema import Preset

    docs = (Path(__file__).parent.parent / "docs" / "presets.md").read_text()
    for section, field in Preset.model_fields.items():
        annotation = field.annotation
        if hasattr(annotation, "model_fields"):
            for key in annotation.model_fields:
                assert f"`{section}.{key}`" in docs, f"docs/presets.md does not describe {section}.{key}"
        else:
            assert f"`{section}`" in docs


def test_resolved_preset_round_trips_through_yaml(tmp_path: Path) -> None:
    from lora_cli.config import preset_to_yaml, validate_preset

    preset = load_preset(write(tmp_path, MINIMAL), ["train.learning_rate=2e-4"])
    again = validate_preset(yaml.safe_load(preset_to_yaml(preset)), "resolved")
    assert again == preset


@pytest.mark.parametrize("preset", sorted((Path(__file__).parents[1] / "presets").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_presets_validate(preset: Path) -> None:
    loaded = load_preset(preset)
    assert loaded.train.steps or loaded.train.epochs
