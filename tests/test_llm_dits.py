"""Z-Image and Qwen-Image adapters as their community's tools write them: musubi-tuner (`lora_unet_` stems of
diffusers' module names), ai-toolkit and ComfyUI (`diffusion_model.`), DiffSynth-Studio (peft's parameter names
under adapter name `default`), ComfyUI's own Z-Image files (the original fused `attention.qkv`). lora-cli's merge
must equal diffusers' `load_lora_weights` + `fuse_lora` of the same file (for DiffSynth, of the same layers in
diffusers' layout, which its converter reads)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tests.conftest import TINY_BUILDERS, run_command, train_preset
from tests.test_interop import assert_same_weights, base_state, fused_by_diffusers, merged_by_lora_cli, random_layers

ARCHITECTURES = {
    # tiny base: (block modules and their (out, in) shapes given the width C and feed-forward width F)
    "z-image": lambda c, f: {"attention.to_q": (c, c), "attention.to_out.0": (c, c), "feed_forward.w1": (f, c)},
    "qwen-image": lambda c, f: {"attn.to_q": (c, c), "attn.add_v_proj": (c, c), "img_mlp.net.2": (c, f)},
}
BLOCKS = {"z-image": "layers", "qwen-image": "transformer_blocks"}


def _shapes(base: Path, name: str) -> dict[str, tuple[int, int]]:
    """Module path -> weight shape for two blocks of the tiny base, from its transformer's weights."""
    weights = load_file(str(base / "transformer" / "diffusion_pytorch_model.safetensors"))
    width = weights[f"{BLOCKS[name]}.0.{next(iter(ARCHITECTURES[name](0, 0)))}.weight"].shape[0]
    hidden = max(shape[0] for key, shape in ((k, v.shape) for k, v in weights.items()) if key.endswith("w1.weight")
                 or key.endswith("img_mlp.net.0.proj.weight"))  # fmt: skip
    layers = ARCHITECTURES[name](width, hidden)
    return {f"{BLOCKS[name]}.{block}.{module}": shape for block in (0, 1) for module, shape in layers.items()}


def _peft(shapes: dict, seed: int) -> dict[str, torch.Tensor]:
    """The layers in diffusers' layout (alpha folded: diffusers' files carry no alpha, so the scale is 1)."""
    layers = random_layers(shapes, rank=4, seed=seed, names=("lora_A", "lora_B"))
    return {f"transformer.{key}": value for key, value in layers.items() if not key.endswith(".alpha")}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_community_layouts_merge_as_diffusers_loads_them(name: str, tiny_base, tmp_path: Path) -> None:
    base = tiny_base(name)
    shapes = _shapes(base, name)
    musubi = random_layers({"lora_unet_" + key.replace(".", "_"): shape for key, shape in shapes.items()}, 4, 3)
    ai_toolkit = {f"diffusion_model.{k}": v for k, v in random_layers(shapes, 4, 3, ("lora_A", "lora_B")).items()}
    peft = _peft(shapes, seed=4)
    diffsynth = {  # peft's parameter names: `<module>.lora_A.default.weight`
        key.removeprefix("transformer.").replace(".weight", ".default.weight"): value for key, value in peft.items()
    }
    files = {"musubi": musubi, "ai-toolkit": ai_toolkit, "diffsynth": diffsynth}
    references = {"musubi": musubi, "ai-toolkit": ai_toolkit, "diffsynth": peft}
    untouched = base_state(base)
    for tool, tensors in files.items():
        path = tmp_path / f"{tool}.safetensors"
        save_file(tensors, str(path))
        ours = merged_by_lora_cli(base, path, tmp_path / f"merged-{tool}")
        assert_same_weights(ours, fused_by_diffusers(base, dict(references[tool])), untouched, len(shapes))
    report = json.loads(
        run_command("info", str(tmp_path / "diffsynth.safetensors"), "--base", str(base), "--json").stdout
    )
    assert report["layout"] == "diffsynth" and report["fit"]["fits"]


def test_comfyui_fused_qkv_z_image_files_are_split_like_musubis(tiny_base, tmp_path: Path) -> None:
    """ComfyUI writes Z-Image's original names (`attention.qkv` fused, `attention.out`); diffusers splits a fused
    qkv only in musubi's stems, so lora-cli respells the file and merges what diffusers merges for those stems."""
    base = tiny_base("z-image")
    width = _shapes(base, "z-image")["layers.0.attention.to_q"][0]
    shapes = {"layers.0.attention.qkv": (3 * width, width), "layers.1.attention.out": (width, width)}
    comfy = {f"diffusion_model.{key}": value for key, value in random_layers(shapes, 4, 5).items()}
    musubi = {f"lora_unet_{key.replace('.', '_', 2).replace('attention.', 'attention_')}": value
              for key, value in random_layers(shapes, 4, 5).items()}  # fmt: skip
    save_file(comfy, str(tmp_path / "comfy.safetensors"))
    ours = merged_by_lora_cli(base, tmp_path / "comfy.safetensors", tmp_path / "merged")
    assert_same_weights(ours, fused_by_diffusers(base, musubi), base_state(base), 4)  # q, k, v and out


def test_qwen_image_refuses_a_step_count_its_scheduler_cannot_draw(tiny_base, tmp_path: Path) -> None:
    """diffusers' Qwen-Image scheduler stretches its sigmas to a terminal value, which divides by zero with one
    step; lora-sample stops on the non-finite latents in one line instead of writing a black image."""
    args = ["--base", str(tiny_base("qwen-image")), "--prompt", "a yellow star", "--size", "32"]
    result = run_command("sample", *args, "--steps", "1", "--out", str(tmp_path / "one"))
    assert result.returncode == 2 and not list((tmp_path / "one").glob("*.png"))
    assert "non-finite at denoising step 1" in result.stderr.strip().splitlines()[-1]
    assert run_command("sample", *args, "--steps", "2", "--out", str(tmp_path / "two")).returncode == 0


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_an_offloaded_run_trains_as_a_resident_one(name: str, tiny_base, write_preset, tmp_path: Path) -> None:
    """Two blocks (Z-Image: the last joint layers; Qwen-Image: the last MMDiT blocks) and the LLM text encoder's
    layers offloaded: the same losses and adapter as a resident run, previews on."""
    from tests.test_offload import preset_sections

    runs = {}
    for offload in (0, 2):
        out = tmp_path / f"offload-{offload}"
        preset = write_preset(f"p{offload}.yaml", **preset_sections(tiny_base(name), out, offload))
        result = run_command("train", str(preset), "--no-progress")
        assert result.returncode == 0, result.stderr[-2000:]
        losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[offload] = (losses, load_file(str(next(out.glob("*.safetensors")))))
    assert runs[0][0] == runs[2][0]
    for key, value in runs[0][1].items():
        assert torch.equal(value, runs[2][1][key]), key


def test_flux2_original_names_merge_as_diffusers_converts_them(tiny_base, tmp_path: Path) -> None:
    """musubi-tuner (`lora_unet_double_blocks_0_img_attn_qkv`, alphas) and ai-toolkit (`diffusion_model.
    double_blocks.0.img_attn.qkv.lora_A`) write Black Forest Labs' FLUX.2 names: fused q/k/v per stream, the
    single blocks' fused `linear1` (q/k/v + MLP-in) and `linear2`. diffusers' FLUX.2 converter splits them; lora-cli
    reads them through it, so its merge equals diffusers' load + fuse."""
    base = tiny_base("flux2")
    config = json.loads((base / "transformer" / "config.json").read_text())
    width = config["num_attention_heads"] * config["attention_head_dim"]
    hidden = int(width * config["mlp_ratio"])
    shapes = {}
    for stream in ("img", "txt"):
        shapes[f"double_blocks.0.{stream}_attn.qkv"] = (3 * width, width)
        shapes[f"double_blocks.0.{stream}_attn.proj"] = (width, width)
        shapes[f"double_blocks.0.{stream}_mlp.0"] = (2 * hidden, width)
        shapes[f"double_blocks.0.{stream}_mlp.2"] = (width, hidden)
    shapes["single_blocks.1.linear1"] = (3 * width + 2 * hidden, width)
    shapes["single_blocks.1.linear2"] = (width, width + hidden)
    musubi = random_layers({"lora_unet_" + key.replace(".", "_"): shape for key, shape in shapes.items()}, 4, 6)
    ai_toolkit = {
        f"diffusion_model.{key}": value
        for key, value in random_layers(shapes, 4, 7, ("lora_A", "lora_B")).items()
        if not key.endswith(".alpha")  # ai-toolkit writes none (alpha = rank)
    }
    untouched = base_state(base)
    for tool, tensors in (("musubi", musubi), ("ai-toolkit", ai_toolkit)):
        path = tmp_path / f"{tool}.safetensors"
        save_file(tensors, str(path))
        ours = merged_by_lora_cli(base, path, tmp_path / f"merged-{tool}")
        assert_same_weights(ours, fused_by_diffusers(base, dict(tensors)), untouched, 10)


def test_rank_patterns_name_only_their_own_module(tiny_base, tmp_path: Path) -> None:
    """HunyuanVideo has `time_text_embed.text_embedder.linear_2` and `context_embedder.time_text_embed.
    text_embedder.linear_2`: peft matches pattern keys at a name's end, so a rank/alpha entry for the first would
    also set the second. Written by lora-cli with different ranks, diffusers' loader gives each its own scale
    (the same merge as lora-cli's), and so does lora-cli's reader."""
    from lora_cli.adapters.files import write_adapter
    from lora_cli.adapters.registry import get_algorithm
    from lora_cli.models.registry import architecture_named

    base = tiny_base("hunyuan-video")
    generator = torch.Generator().manual_seed(8)
    tensors, ranks = {}, {}
    for module, rank in (("time_text_embed.text_embedder.linear_2", 2),
                         ("context_embedder.time_text_embed.text_embedder.linear_2", 4), ("proj_out", 4)):  # fmt: skip
        out_features = 16 if module == "proj_out" else 32
        tensors[("transformer", module)] = {
            "lora_down.weight": torch.randn(rank, 32, generator=generator),
            "lora_up.weight": torch.randn(out_features, rank, generator=generator),
            "alpha": torch.tensor(float(rank) / 2),
        }
        ranks[("transformer", module)] = rank
    path = tmp_path / "ranks.safetensors"
    write_adapter(path, tensors, ranks, get_algorithm("lora"), "diffusers", architecture_named("hunyuan-video"), {})
    untouched = base_state(base)
    ours = merged_by_lora_cli(base, path, tmp_path / "merged")
    assert_same_weights(ours, fused_by_diffusers(base, path), untouched, 3)
    for (_, module), named in tensors.items():
        expected = (
            untouched["transformer"][f"{module}.weight"] + 0.5 * named["lora_up.weight"] @ named["lora_down.weight"]
        )
        torch.testing.assert_close(ours["transformer"][f"{module}.weight"], expected, rtol=1e-4, atol=1e-5)


def test_hunyuan_video_original_names_merge_to_their_split_updates(tiny_base, tmp_path: Path) -> None:
    """musubi-tuner (`lora_unet_double_blocks_0_img_attn_qkv`, alphas) and ComfyUI (`diffusion_model.
    double_blocks.0.img_attn_qkv.lora_A`) write Tencent's names: fused q/k/v per stream and the single blocks'
    `linear1` (q, k, v, MLP-in; diffusers' converter splits it at width 3072 only). Each fused update must land
    in diffusers' modules row block by row block: lora-cli's merge equals base + the split update."""
    base = tiny_base("hunyuan-video")
    config = json.loads((base / "transformer" / "config.json").read_text())
    width = config["num_attention_heads"] * config["attention_head_dim"]
    fused = {  # original layer -> (diffusers modules in row order, each one's rows)
        "double_blocks.0.img_attn_qkv": (["transformer_blocks.0.attn.to_" + x for x in "qkv"], [width] * 3),
        "double_blocks.0.txt_attn_qkv": ([f"transformer_blocks.0.attn.add_{x}_proj" for x in "qkv"], [width] * 3),
        "double_blocks.0.img_mlp.fc1": (["transformer_blocks.0.ff.net.0.proj"], [4 * width]),
        "single_blocks.0.linear1": (
            ["single_transformer_blocks.0.attn.to_" + x for x in "qkv"] + ["single_transformer_blocks.0.proj_mlp"],
            [width, width, width, 4 * width],
        ),
    }
    shapes = {layer: (sum(rows), width) for layer, (_, rows) in fused.items()}
    layers = random_layers(shapes, rank=4, seed=9)  # alpha = rank / 2
    musubi = {}
    for key, value in layers.items():
        layer = key.removesuffix(".alpha").split(".lora_")[0]
        musubi["lora_unet_" + layer.replace(".", "_") + key[len(layer) :]] = value
    comfy = {f"diffusion_model.{key}": value for key, value in layers.items()}
    untouched = base_state(base)["transformer"]
    for tool, tensors in (("musubi", musubi), ("comfyui", comfy)):
        path = tmp_path / f"{tool}.safetensors"
        save_file(tensors, str(path))
        merged = merged_by_lora_cli(base, path, tmp_path / f"merged-{tool}")["transformer"]
        for layer, (modules, rows) in fused.items():
            update = 0.5 * layers[f"{layer}.lora_up.weight"] @ layers[f"{layer}.lora_down.weight"]
            for module, part in zip(modules, update.split(rows), strict=True):
                expected = untouched[f"{module}.weight"] + part
                torch.testing.assert_close(
                    merged[f"{module}.weight"], expected, rtol=1e-4, atol=1e-5, msg=tool + module
                )


@pytest.mark.parametrize("name", ["z-image", "qwen-image", "flux2"])
def test_a_4bit_base_trains_and_samples(name: str, shapes_data: Path, tmp_path: Path) -> None:
    """nf4 transformers (64-wide layers, what 4-bit quantization takes): the adapter trains and changes what
    lora-sample draws from the same quantized base."""
    from importlib import import_module

    module, function = TINY_BUILDERS[name].split(":")
    base = getattr(import_module(module), function)(tmp_path / "wide", heads=4)
    raw = {
        "model": {"path": str(base), "max_text_tokens": 16, "quantize": "nf4"},
        "data": {"folder": str(shapes_data), "resolution": 64},
        "adapter": {"rank": 4, "alpha": 4, "targets": "attention_ff"},
        "train": {"steps": 3, "learning_rate": 3e-2, "batch_size": 2},
        "output": {"dir": str(tmp_path / "run"), "name": name},
    }
    adapter = train_preset(raw, name)
    args = ["--base", str(base), "--quantize", "nf4", "--prompt", "a yellow star", "--size", "64", "--steps", "2"]
    drawn = {}
    for label, extra in (("plain", []), ("adapted", ["--adapter", str(adapter)])):
        result = run_command("sample", *args, *extra, "--out", str(tmp_path / label))
        assert result.returncode == 0, result.stderr[-2000:]
        drawn[label] = np.asarray(Image.open(next((tmp_path / label).glob("000-*.png"))), dtype=np.int16)
    assert np.abs(drawn["adapted"] - drawn["plain"]).max() > 2


def test_longcat_image_stock_pipeline_draws_the_merged_adapter_as_lora_sample(tiny_base, shapes_data, tmp_path) -> None:
    """diffusers has no LoRA loader for LongCat-Image; its stock pipeline is the referee through the merged model
    (the same text length, prompt rewriting off): what it draws equals what lora-sample draws with the adapter."""
    from diffusers import LongCatImagePipeline

    from lora_cli.toolbox.merge import merge_adapters

    base = tiny_base("longcat-image")
    raw = {
        "model": {"path": str(base), "max_text_tokens": 32},
        "data": {"folder": str(shapes_data), "resolution": 64},
        "adapter": {"rank": 4, "alpha": 2, "targets": "attention_ff"},
        "train": {"steps": 3, "learning_rate": 3e-2, "batch_size": 2},
        "output": {"dir": str(tmp_path / "run"), "name": "longcat"},
    }
    adapter = train_preset(raw, "longcat")
    args = ["--base", str(base), "--prompt", "a yellow star", "--size", "64", "--steps", "3", "--guidance", "4.5"]
    drawn = {}
    for label, extra in (("plain", []), ("adapted", ["--adapter", str(adapter)])):
        assert run_command("sample", *args, *extra, "--out", str(tmp_path / label)).returncode == 0
        drawn[label] = np.asarray(Image.open(next((tmp_path / label).glob("000-*.png"))), dtype=np.int16)
    merge_adapters(base, [(adapter, 1.0)], tmp_path / "merged")
    pipe = LongCatImagePipeline.from_pretrained(tmp_path / "merged")
    pipe.set_progress_bar_config(disable=True)
    pipe.tokenizer_max_length = 32  # the adapter's text length (lora-sample reads it from the file)
    image = pipe(prompt="a yellow star", height=64, width=64, num_inference_steps=3, guidance_scale=4.5,
                 generator=torch.Generator().manual_seed(0), enable_prompt_rewrite=False).images[0]  # fmt: skip
    assert np.abs(drawn["adapted"] - drawn["plain"]).max() > 5
    assert np.abs(np.asarray(image, dtype=np.int16) - drawn["adapted"]).max() <= 1


def test_hunyuan_video_exports_tencents_fused_names_for_comfyui(tiny_base, clips: Path, tmp_path: Path) -> None:
    """`lora-convert --to original` writes a HunyuanVideo LoRA in the names ComfyUI maps for it (`diffusion_model.`
    + Tencent's fused modules): every layer's update is kept exactly (read back through the converter, merged
    into the same weights); what the names cannot hold is refused in one line."""
    from lora_cli.adapters.functional import delta_weight
    from tests.conftest import read_for_base

    base = tiny_base("hunyuan-video")
    raw = {
        "model": {"path": str(base), "max_text_tokens": 16},
        "data": {"folder": str(clips), "resolution": 32, "frames": 5},
        "adapter": {"rank": 4, "alpha": 2, "targets": "attention_ff"},
        "train": {"steps": 2, "learning_rate": 3e-2, "batch_size": 2},
        "output": {"dir": str(tmp_path / "run"), "name": "hv"},
    }
    adapter = train_preset(raw, "hv")
    exported = tmp_path / "original.safetensors"
    result = run_command("convert", str(adapter), str(exported), "--to", "original")
    assert result.returncode == 0, result.stderr
    keys = set(load_file(exported))
    assert all(key.startswith(("diffusion_model.double_blocks.", "diffusion_model.single_blocks.")) for key in keys)
    assert {"diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight",
            "diffusion_model.single_blocks.0.linear1.lora_B.weight"} <= keys  # fmt: skip
    trained, back = read_for_base(adapter, base).tensors, read_for_base(exported, base).tensors
    assert trained.keys() == back.keys()
    for key, named in trained.items():
        shape = (named["lora_up.weight"].shape[0], named["lora_down.weight"].shape[1])
        torch.testing.assert_close(delta_weight(back[key], shape), delta_weight(named, shape), rtol=1e-5, atol=1e-7)
    ours = merged_by_lora_cli(base, exported, tmp_path / "merged")["transformer"]
    reference = merged_by_lora_cli(base, adapter, tmp_path / "reference")["transformer"]
    for name, value in reference.items():
        torch.testing.assert_close(ours[name], value, rtol=1e-5, atol=1e-6)
    # what the names cannot hold: a DoRA magnitude, a module outside the blocks, another architecture's LoRA
    flat = load_file(adapter)
    module = next(key for key in flat if key.endswith(".lora_B.weight")).removesuffix(".lora_B.weight")
    flat[f"{module}.lora_magnitude_vector"] = torch.ones(flat[f"{module}.lora_B.weight"].shape[0])
    save_file(flat, str(tmp_path / "dora.safetensors"))
    outside = random_layers({"transformer.proj_out": (16, 32)}, 4, 1, ("lora_A", "lora_B"))
    save_file({k: v for k, v in outside.items() if not k.endswith(".alpha")}, str(tmp_path / "outside.safetensors"))
    flux = tiny_base("flux")
    width = load_file(str(flux / "transformer" / "diffusion_pytorch_model.safetensors"))["x_embedder.weight"].shape[0]
    layers = random_layers({"transformer.transformer_blocks.0.attn.to_q": (width, width)}, 4, 2, ("lora_A", "lora_B"))
    save_file({k: v for k, v in layers.items() if not k.endswith(".alpha")}, str(tmp_path / "flux.safetensors"))
    for name, extra, message in (("dora", ["--base", str(base)], "LoRA on the transformer only"),
                                 ("outside", ["--base", str(base)], "double and single blocks only, not proj_out"),
                                 ("flux", ["--base", str(flux)], "the original layout is HunyuanVideo's")):  # fmt: skip
        result = run_command("convert", str(tmp_path / f"{name}.safetensors"), str(tmp_path / "x.safetensors"),
                             "--to", "original", *extra)  # fmt: skip
        assert result.returncode == 2 and message in result.stderr.strip().splitlines()[-1], result.stderr[-600:]
