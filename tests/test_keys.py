"""Key layouts on constant tensors: lora-cli's own layouts round-trip exactly, names that match no layer are
errors, damaged files are refused."""

from __future__ import annotations

import json

import pytest
import torch

from lora_cli.adapters.catalog import ModuleCatalog
from lora_cli.adapters.files import read_adapter, read_adapter_standalone, write_adapter
from lora_cli.adapters.keys import to_kohya
from lora_cli.adapters.registry import get_algorithm
from lora_cli.errors import AdapterError
from lora_cli.models.stable_diffusion import StableDiffusion

ARCHITECTURE = StableDiffusion()
MODULES = {
    "unet": ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "mid_block.resnets.0.conv1"],
    "text_encoder": ["encoder.layers.0.self_attn.q_proj"],  # transformers 5 CLIP: no `text_model.` level
}
SHAPES = {("unet", MODULES["unet"][0]): (8, 8), ("unet", MODULES["unet"][1]): (8, 2, 2, 2),
          ("text_encoder", MODULES["text_encoder"][0]): (8, 8)}  # fmt: skip
CATALOG = ModuleCatalog(ARCHITECTURE, SHAPES)
RANKS = dict.fromkeys(SHAPES, 4)


def constant_adapter(alpha: float = 2.0) -> dict:
    tensors = {}
    for number, (key, shape) in enumerate(SHAPES.items()):
        tensors[key] = {
            "lora_down.weight": torch.full((4, *shape[1:]), float(number + 1)),
            "lora_up.weight": torch.full((shape[0], 4, *([1, 1] if len(shape) == 4 else [])), -float(number + 1)),
            "alpha": torch.tensor(alpha),
        }
    return tensors


def test_kohya_names() -> None:
    flat = to_kohya(constant_adapter(), ARCHITECTURE.kohya_table)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in flat
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in flat


@pytest.mark.parametrize("file_format", ["kohya", "diffusers"])
def test_adapter_file_round_trip_keeps_alpha(tmp_path, file_format: str) -> None:
    adapter = constant_adapter(alpha=3.0)
    path = tmp_path / "a.safetensors"
    write_adapter(path, adapter, RANKS, get_algorithm("lora"), file_format, ARCHITECTURE, {"lora_cli.rank": "4"})
    for file in (read_adapter(path, CATALOG), *([read_adapter_standalone(path)] if file_format == "diffusers" else [])):
        assert file.algorithm.name == "lora" and file.layout == file_format
        assert file.metadata["lora_cli.format"] == file_format and file.metadata["lora_cli.rank"] == "4"
        assert file.tensors.keys() == adapter.keys()
        for key, named in adapter.items():
            assert file.tensors[key].keys() == named.keys()
            for name, value in named.items():
                assert torch.equal(file.tensors[key][name], value), (key, name)


def test_keys_that_match_no_layer_are_an_error_or_listed(tmp_path) -> None:
    flat = to_kohya(constant_adapter(), ARCHITECTURE.kohya_table)
    flat["lora_unet_not_a_layer.lora_down.weight"] = torch.zeros(1, 8)
    flat["lora_unet_not_a_layer.lora_up.weight"] = torch.zeros(8, 1)
    path = tmp_path / "extra.safetensors"
    from safetensors.torch import save_file

    save_file(flat, str(path))
    with pytest.raises(
        AdapterError, match="1 adapter layer\\(s\\) match nothing in the base, e.g. lora_unet_not_a_layer"
    ):
        read_adapter(path, CATALOG)
    assert read_adapter(path, CATALOG, allow_partial=True).unmatched == ["lora_unet_not_a_layer"]
    foreign = ModuleCatalog(ARCHITECTURE, {("unet", "other.layer"): (8, 8)})
    with pytest.raises(AdapterError, match="none of its 4 layers matches this stable-diffusion base"):
        read_adapter(path, foreign)


def test_damaged_nonfinite_and_pickle_adapters_are_refused(tmp_path) -> None:
    lora = get_algorithm("lora")
    truncated = tmp_path / "cut.safetensors"
    write_adapter(truncated, constant_adapter(), RANKS, lora, "kohya", ARCHITECTURE, {})
    truncated.write_bytes(truncated.read_bytes()[:-10])
    with pytest.raises(AdapterError, match="damaged"):
        read_adapter(truncated, CATALOG)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(AdapterError, match="header length"):
        read_adapter(garbage, CATALOG)
    with pytest.raises(AdapterError, match="pickle"):
        read_adapter(tmp_path / "old.ckpt", CATALOG)
    broken = constant_adapter()
    broken[("unet", MODULES["unet"][1])]["lora_up.weight"][0, 0] = float("nan")
    nan = tmp_path / "nan.safetensors"
    write_adapter(nan, broken, RANKS, lora, "kohya", ARCHITECTURE, {})
    with pytest.raises(AdapterError, match="tensor lora_unet_mid_block_resnets_0_conv1.lora_up.weight holds NaN"):
        read_adapter(nan, CATALOG)


def test_diffusers_layout_records_dora_for_diffusers_loader(tmp_path) -> None:
    from safetensors import safe_open

    adapter = constant_adapter()
    for key, named in adapter.items():
        named["dora_scale"] = torch.ones(SHAPES[key][0])
    path = tmp_path / "dora.safetensors"
    write_adapter(path, adapter, RANKS, get_algorithm("lora"), "diffusers", ARCHITECTURE, {})
    with safe_open(str(path), "pt") as handle:
        config = json.loads(handle.metadata()["lora_adapter_metadata"])
        names = list(handle.keys())
    assert "unet.mid_block.resnets.0.conv1.lora_magnitude_vector" in names
    assert config["unet.use_dora"] is True and config["text_encoder.use_dora"] is True


def test_layouts_that_cannot_hold_an_algorithm_are_refused(tmp_path) -> None:
    with pytest.raises(AdapterError, match="the diffusers layout cannot hold loha adapters; use kohya"):
        write_adapter(tmp_path / "x.safetensors", {}, {}, get_algorithm("loha"), "diffusers", ARCHITECTURE, {})
