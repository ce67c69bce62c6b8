"""Key-format conversions on constant tensors: exact both ways, and leftovers are errors."""

from __future__ import annotations

import pytest
import torch

from lora_cli.adapters.registry import get_algorithm
from lora_cli.errors import AdapterError
from lora_cli.io.adapter_file import read_adapter, save_adapter
from lora_cli.io.keys import from_kohya, kohya_module_index, to_kohya
from lora_cli.models.stable_diffusion import StableDiffusion

PREFIXES = StableDiffusion.kohya_table
MODULES = {
    "unet": ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "mid_block.resnets.0.conv1"],
    "text_encoder": ["encoder.layers.0.self_attn.q_proj"],  # transformers 5 CLIP: no `text_model.` level
}


RANKS = {(c, m): 4 for c, names in MODULES.items() for m in names}


def constant_adapter(alpha: float = 2.0) -> dict:
    tensors = {}
    for number, key in enumerate((c, m) for c, names in MODULES.items() for m in names):
        tensors[key] = {
            "lora_down.weight": torch.full((4, 8), float(number + 1)),
            "lora_up.weight": torch.full((8, 4), -float(number + 1)),
            "alpha": torch.tensor(alpha),
        }
    return tensors


def test_kohya_names_and_inverse_are_exact() -> None:
    adapter = constant_adapter()
    flat = to_kohya(adapter, PREFIXES)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in flat
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in flat
    back = from_kohya(flat, kohya_module_index(MODULES, PREFIXES), "test")
    assert back.keys() == adapter.keys()
    for key, named in adapter.items():
        for name, value in named.items():
            assert torch.equal(back[key][name], value)


def test_kohya_keys_that_match_no_layer_are_an_error() -> None:
    flat = to_kohya(constant_adapter(), PREFIXES)
    flat["lora_unet_not_a_layer.lora_down.weight"] = torch.zeros(1)
    with pytest.raises(
        AdapterError, match="1 adapter layer\\(s\\) match nothing in the base, e.g. lora_unet_not_a_layer"
    ):
        from_kohya(flat, kohya_module_index(MODULES, PREFIXES), "file.safetensors")


@pytest.mark.parametrize("file_format", ["kohya", "diffusers"])
def test_adapter_file_round_trip_keeps_alpha(tmp_path, file_format: str) -> None:
    adapter = constant_adapter(alpha=3.0)
    path = tmp_path / "a.safetensors"
    lora = get_algorithm("lora")
    save_adapter(path, adapter, RANKS, lora, file_format, PREFIXES, {"lora_cli.rank": "4"})
    algorithm, back, metadata = read_adapter(path, kohya_module_index(MODULES, PREFIXES))
    assert algorithm.name == "lora"
    assert metadata["lora_cli.format"] == file_format and metadata["lora_cli.rank"] == "4"
    assert back.keys() == adapter.keys()
    for key, named in adapter.items():
        assert back[key].keys() == named.keys()
        for name, value in named.items():
            assert torch.equal(back[key][name], value), (key, name)


def test_damaged_and_pickle_adapters_are_refused(tmp_path) -> None:
    lora = get_algorithm("lora")
    index = kohya_module_index(MODULES, PREFIXES)
    truncated = tmp_path / "cut.safetensors"
    save_adapter(truncated, constant_adapter(), RANKS, lora, "kohya", PREFIXES, {})
    truncated.write_bytes(truncated.read_bytes()[:-10])
    with pytest.raises(AdapterError, match="damaged"):
        read_adapter(truncated, index)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(AdapterError, match="header length"):
        read_adapter(garbage, index)
    with pytest.raises(AdapterError, match="pickle"):
        read_adapter(tmp_path / "old.ckpt", index)


def test_diffusers_layout_records_dora_for_diffusers_loader(tmp_path) -> None:
    import json

    from safetensors import safe_open

    adapter = constant_adapter()
    for named in adapter.values():
        named["dora_scale"] = torch.ones(8)
    path = tmp_path / "dora.safetensors"
    save_adapter(path, adapter, RANKS, get_algorithm("lora"), "diffusers", PREFIXES, {})
    with safe_open(str(path), "pt") as handle:
        config = json.loads(handle.metadata()["lora_adapter_metadata"])
        names = list(handle.keys())
    assert "unet.mid_block.resnets.0.conv1.lora_magnitude_vector" in names
    assert config["unet.use_dora"] is True and config["text_encoder.use_dora"] is True
