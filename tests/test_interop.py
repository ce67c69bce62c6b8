"""Adapter files as users download them, made by the tools that write them (diffusers' and peft's own save
functions, or the documented layout of kohya's sd-scripts, ComfyUI and musubi-tuner), judged by diffusers'
own loader: what lora-cli merges and draws from a file equals what `load_lora_weights` + `fuse_lora` makes
of it, and every file lora-cli writes in the diffusers layout is consumed by that loader key for key."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console
from safetensors.torch import load_file, save_file

from lora_cli.sampling.run import SampleRequest, run_sampling
from lora_cli.toolbox.merge import merge_adapters
from tests.conftest import run_command, train_preset


def diffusers_pipeline(folder: Path):
    from diffusers import DiffusionPipeline

    index = json.loads((folder / "model_index.json").read_text())["_class_name"]
    flags = {"safety_checker": None, "requires_safety_checker": False} if index == "StableDiffusionPipeline" else {}
    pipe = DiffusionPipeline.from_pretrained(folder, **flags)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def fused_by_diffusers(folder: Path, adapter: Path | dict) -> dict[str, dict[str, torch.Tensor]]:
    """Every component's weights after diffusers' `load_lora_weights` and `fuse_lora` (the referee)."""
    pipe = diffusers_pipeline(folder)
    pipe.load_lora_weights(adapter if isinstance(adapter, dict) else str(adapter))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return {
        name: component.state_dict() for name, component in pipe.components.items() if hasattr(component, "state_dict")
    }


def merged_by_lora_cli(folder: Path, adapter: Path, out: Path) -> dict[str, dict[str, torch.Tensor]]:
    merge_adapters(folder, [(adapter, 1.0)], out)
    loaded = diffusers_pipeline(out)
    return {
        name: component.state_dict()
        for name, component in loaded.components.items()
        if hasattr(component, "state_dict")
    }


def assert_same_weights(ours: dict, theirs: dict, base: dict, at_least: int) -> None:
    """The same weights within float rounding, and at least `at_least` tensors changed from the base."""
    changed = 0
    for component, state in theirs.items():
        for name, value in state.items():
            torch.testing.assert_close(ours[component][name], value, rtol=1e-4, atol=1e-5, msg=f"{component}.{name}")
            changed += not torch.equal(value, base[component][name])
    assert changed >= at_least, f"only {changed} tensors changed"


def base_state(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    pipe = diffusers_pipeline(folder)
    return {
        name: component.state_dict() for name, component in pipe.components.items() if hasattr(component, "state_dict")
    }


@pytest.fixture(scope="module")
def sd_text_encoder_lora(tiny_sd: Path, shapes_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A UNet + text-encoder LoRA trained by lora-train, and its layers as peft state dicts per component."""
    folder = tmp_path_factory.mktemp("te-lora")
    raw = {
        "model": {"path": str(tiny_sd)},
        "data": {"folder": str(shapes_data), "resolution": 64},
        "adapter": {"rank": 4, "alpha": 2, "text_encoder": True, "targets": "attention_ff"},
        "train": {"steps": 2, "learning_rate": 3e-2, "batch_size": 2},
        "output": {"dir": str(folder), "name": "te", "format": "diffusers"},
    }
    path = train_preset(raw, "te")
    tensors = load_file(str(path))
    by_component = {
        component: {k.removeprefix(component + "."): v for k, v in tensors.items() if k.startswith(component + ".")}
        for component in ("unet", "text_encoder")
    }
    return {"path": path, "peft": by_component}


def test_diffusers_dreambooth_example_file_is_read_as_diffusers_reads_it(
    tiny_sd: Path, sd_text_encoder_lora: dict, tmp_path: Path
) -> None:
    """diffusers' examples/dreambooth/train_dreambooth_lora.py saves `convert_state_dict_to_diffusers` of peft's
    state dicts through `save_lora_weights`: `…to_k.lora.down.weight` and `…k_proj.lora_linear_layer.down.weight`."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    peft = sd_text_encoder_lora["peft"]
    example = tmp_path / "example"
    StableDiffusionPipeline.save_lora_weights(
        example,
        unet_lora_layers=convert_state_dict_to_diffusers(peft["unet"]),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(peft["text_encoder"]),
        safe_serialization=True,
    )
    file = example / "pytorch_lora_weights.safetensors"
    keys = list(load_file(str(file)))
    assert any(".to_k.lora.down.weight" in k for k in keys) and any("lora_linear_layer.down" in k for k in keys)
    assert_same_weights(
        merged_by_lora_cli(tiny_sd, file, tmp_path / "merged"),
        fused_by_diffusers(tiny_sd, file),
        base_state(tiny_sd),
        20,
    )
    info = run_command("info", str(file), "--base", str(tiny_sd), "--json")
    report = json.loads(info.stdout)
    assert report["layout"] == "diffusers (attention processors)" and report["fit"]["fits"], info.stderr


def test_text_encoder_names_with_and_without_text_model_match_the_same_layers(
    tiny_sd: Path, sd_text_encoder_lora: dict, tmp_path: Path
) -> None:
    """Files written with transformers 4 spell CLIP's modules `text_model.encoder…`; both spellings fit."""
    from safetensors import safe_open

    tensors = load_file(str(sd_text_encoder_lora["path"]))
    with safe_open(str(sd_text_encoder_lora["path"]), "pt") as handle:
        metadata = handle.metadata()  # rank and alpha for diffusers' loader
    old = {k.replace("text_encoder.encoder.", "text_encoder.text_model.encoder."): v for k, v in tensors.items()}
    assert old != tensors
    spelled = tmp_path / "transformers4.safetensors"
    save_file(old, str(spelled), metadata=metadata)
    ours = merged_by_lora_cli(tiny_sd, spelled, tmp_path / "merged")
    reference = merged_by_lora_cli(tiny_sd, sd_text_encoder_lora["path"], tmp_path / "reference")
    for name, value in reference["text_encoder"].items():
        assert torch.equal(ours["text_encoder"][name], value), name


def test_peft_save_pretrained_folder(tiny_sd: Path, tmp_path: Path) -> None:
    """A UNet adapter saved by peft's own `save_pretrained` (alpha in adapter_config.json) merges as peft merges."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model

    unet = UNet2DConditionModel.from_pretrained(tiny_sd / "unet")
    config = LoraConfig(r=4, lora_alpha=12, target_modules=["to_q", "to_v", "proj_in"], init_lora_weights=False)
    torch.manual_seed(3)
    model = get_peft_model(unet, config)
    model.save_pretrained(tmp_path / "peft-adapter")
    expected = model.merge_and_unload().state_dict()
    merge_adapters(tiny_sd, [(tmp_path / "peft-adapter", 1.0)], tmp_path / "merged")
    merged = load_file(str(tmp_path / "merged" / "unet" / "diffusion_pytorch_model.safetensors"))
    original = load_file(str(tiny_sd / "unet" / "diffusion_pytorch_model.safetensors"))
    assert sum(not torch.equal(merged[k], original[k]) for k in merged) >= 6
    for name, value in expected.items():
        torch.testing.assert_close(merged[name], value, rtol=1e-5, atol=1e-6, msg=name)
    report = json.loads(run_command("info", str(tmp_path / "peft-adapter"), "--json").stdout)
    assert report["layout"] == "peft" and report["alphas"] == {"12.0": report["layers"]}


def test_comfyui_and_kohya_original_unet_names_read_like_diffusers_names(tiny_sdxl: Path, tmp_path: Path) -> None:
    """kohya's SDXL LoRAs name UNet layers by the original blocks (`lora_unet_input_blocks_4_1_…`); diffusers'
    SDXL loader maps them with the UNet's config. lora-cli merges them as diffusers fuses them, and reads the
    same layers in ComfyUI's `diffusion_model.<original path>` spelling identically."""
    from lora_cli.models.single_file import original_unet_modules

    unet = load_file(str(tiny_sdxl / "unet" / "diffusion_pytorch_model.safetensors"))
    modules = [k.removesuffix(".weight") for k in unet if k.endswith(".weight")]
    original = {diffusers: ldm for ldm, diffusers in original_unet_modules(modules).items()}
    chosen = [m for m in modules if m.endswith(("attn1.to_q", "attn2.to_v", "proj_in", "ff.net.2"))]
    generator = torch.Generator().manual_seed(5)
    kohya, comfy = {}, {}
    for module in chosen:
        out_features, in_features = unet[f"{module}.weight"].shape[:2]
        down = torch.randn(4, in_features, *unet[f"{module}.weight"].shape[2:], generator=generator) * 0.1
        up = torch.randn(out_features, 4, *([1, 1] if down.dim() == 4 else []), generator=generator) * 0.1
        stem = "lora_unet_" + original[module].replace(".", "_")
        kohya.update(
            {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(2.0)}
        )
        path = f"diffusion_model.{original[module]}"
        comfy.update(
            {f"{path}.lora_down.weight": down, f"{path}.lora_up.weight": up, f"{path}.alpha": torch.tensor(2.0)}
        )
    assert any("input_blocks" in k for k in kohya)
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    save_file(comfy, str(tmp_path / "comfy.safetensors"))
    ours = merged_by_lora_cli(tiny_sdxl, tmp_path / "kohya.safetensors", tmp_path / "m1")
    assert_same_weights(
        ours, fused_by_diffusers(tiny_sdxl, tmp_path / "kohya.safetensors"), base_state(tiny_sdxl), len(chosen)
    )
    from_comfy = merged_by_lora_cli(tiny_sdxl, tmp_path / "comfy.safetensors", tmp_path / "m2")
    for name, value in ours["unet"].items():
        assert torch.equal(from_comfy["unet"][name], value), name


def test_files_written_in_the_diffusers_layout_are_consumed_key_for_key(
    tiny_sd: Path, sd_text_encoder_lora: dict, tmp_path: Path
) -> None:
    """diffusers' loader takes every tensor of a lora-cli diffusers-layout file (UNet and text encoder), and
    lora-sample draws what diffusers draws with it."""
    from tests.conftest import diffusers_image

    path = sd_text_encoder_lora["path"]
    assert_consumed(diffusers_pipeline(tiny_sd), path)
    drawn = run_sampling(
        SampleRequest(base=str(tiny_sd), prompts=["a red circle"], out=tmp_path / "s", adapters=[(path, 1.0)],
                      steps=3, guidance_scale=7.5, size=64, seed=4),
        Console(quiet=True),
    )[0]  # fmt: skip
    ours = np.asarray(Image.open(drawn), dtype=np.int16)
    assert np.abs(ours - diffusers_image(tiny_sd, path, "a red circle", 4)).max() <= 1


def assert_consumed(pipe, path: Path) -> None:
    """Every tensor of the file sits, unchanged, in the peft layer diffusers' `load_lora_weights` made."""
    pipe.load_lora_weights(str(path), adapter_name="judged")
    names = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_magnitude_vector": "lora_magnitude_vector"}
    tensors = load_file(str(path))
    for key, value in tensors.items():
        component, _, rest = key.partition(".")
        suffix = next(s for s in names if rest.endswith(s))
        layer = getattr(pipe, component).get_submodule(rest[: -len(suffix) - 1])
        held = getattr(layer, names[suffix])["judged"].weight
        assert torch.equal(held.detach().reshape(value.shape), value), key


def random_layers(shapes: dict[str, tuple[int, int]], rank: int, seed: int, names=("lora_down", "lora_up")) -> dict:
    """Random LoRA factors for `{layer key: (out, in)}`, with alpha = rank / 2."""
    generator = torch.Generator().manual_seed(seed)
    down, up = names
    tensors = {}
    for key, (out_features, in_features) in shapes.items():
        tensors[f"{key}.{down}.weight"] = torch.randn(rank, in_features, generator=generator) * 0.1
        tensors[f"{key}.{up}.weight"] = torch.randn(out_features, rank, generator=generator) * 0.1
        tensors[f"{key}.alpha"] = torch.tensor(rank / 2)
    return tensors


def test_flux_kohya_and_comfyui_original_names_merge_as_diffusers_fuses_them(tiny_base, tmp_path: Path) -> None:
    """kohya's sd-scripts and ComfyUI name Flux layers as Black Forest Labs' code does (one fused q/k/v per
    stream); diffusers' Flux converter splits them into its modules. lora-cli reads them through that converter,
    so its merge equals diffusers' load + fuse, and `lora-info --base` names the layout."""
    flux = tiny_base("flux")
    width = json.loads((flux / "transformer" / "config.json").read_text())
    dim = width["num_attention_heads"] * width["attention_head_dim"]
    shapes = {}
    for stream in ("img", "txt"):
        shapes[f"double_blocks_0_{stream}_attn_qkv"] = (3 * dim, dim)
        shapes[f"double_blocks_0_{stream}_attn_proj"] = (dim, dim)
        shapes[f"double_blocks_0_{stream}_mlp_2"] = (dim, 4 * dim)
    shapes["single_blocks_0_linear2"] = (dim, 5 * dim)
    kohya = random_layers({f"lora_unet_{key}": shape for key, shape in shapes.items()}, rank=4, seed=1)
    save_file(kohya, str(tmp_path / "kohya-flux.safetensors"))
    for names, name in ((("lora_down", "lora_up"), "comfy-flux"), (("lora_A", "lora_B"), "bfl-flux")):
        comfy = {}
        for key, value in random_layers(shapes, rank=4, seed=1, names=names).items():
            layer, _, tensor = key.partition(".")
            path = layer.replace("double_blocks_0_", "double_blocks.0.").replace("single_blocks_0_", "single_blocks.0.")
            path = path.replace("_attn_", "_attn.").replace("_mlp_", "_mlp.")
            comfy[f"diffusion_model.{path}.{tensor}"] = value
        save_file(comfy, str(tmp_path / f"{name}.safetensors"))
    base = base_state(flux)
    merged = {}
    for name in ("kohya-flux", "comfy-flux", "bfl-flux"):
        merged[name] = merged_by_lora_cli(flux, tmp_path / f"{name}.safetensors", tmp_path / f"merged-{name}")
    for name in ("kohya-flux", "comfy-flux"):
        assert_same_weights(
            merged[name], fused_by_diffusers(flux, load_file(str(tmp_path / f"{name}.safetensors"))), base, 11
        )
    # BFL's peft-style factor names (`lora_A`), which diffusers' loader reads only in its control-LoRA converter.
    for name, value in merged["comfy-flux"]["transformer"].items():
        assert torch.equal(merged["bfl-flux"]["transformer"][name], value), name
    report = json.loads(
        run_command("info", str(tmp_path / "kohya-flux.safetensors"), "--base", str(flux), "--json").stdout
    )
    assert report["layout"] == "kohya (Flux original names)" and report["fit"]["fits"]


def test_wan_musubi_and_comfyui_names_merge_as_diffusers_fuses_them(tiny_base, tmp_path: Path) -> None:
    """musubi-tuner (`lora_unet_blocks_0_self_attn_q`) and ComfyUI (`diffusion_model.blocks.0.self_attn.q`) use
    Wan's original module names; diffusers' Wan converter maps them and lora-cli reads them through it."""
    wan = tiny_base("wan")
    config = json.loads((wan / "transformer" / "config.json").read_text())
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    shapes = {}  # musubi's target set: every attention projection and both FFN layers of every block
    for block in range(config["num_layers"]):
        for attention in ("self_attn", "cross_attn"):
            shapes.update({f"blocks_{block}_{attention}_{p}": (dim, dim) for p in "qkvo"})
        shapes[f"blocks_{block}_ffn_0"] = (config["ffn_dim"], dim)
        shapes[f"blocks_{block}_ffn_2"] = (dim, config["ffn_dim"])
    musubi = random_layers({f"lora_unet_{key}": shape for key, shape in shapes.items()}, rank=4, seed=2)
    save_file(musubi, str(tmp_path / "musubi.safetensors"))
    comfy = {}
    for key, value in random_layers(shapes, rank=4, seed=2, names=("lora_A", "lora_B")).items():
        layer, _, tensor = key.partition(".")
        block, _, rest = layer.removeprefix("blocks_").partition("_")
        path = f"blocks.{block}." + rest.replace("_attn_", "_attn.").replace("ffn_", "ffn.")
        comfy[f"diffusion_model.{path}.{tensor}"] = value
    save_file(comfy, str(tmp_path / "comfy-wan.safetensors"))
    base = base_state(wan)
    for name in ("musubi", "comfy-wan"):
        file = tmp_path / f"{name}.safetensors"
        assert_same_weights(
            merged_by_lora_cli(wan, file, tmp_path / f"merged-{name}"), fused_by_diffusers(wan, load_file(str(file))),
            base, 10 * config["num_layers"],
        )  # fmt: skip
