"""`lora-merge`: merged weights against independent computations, diffusers' fuse_lora and lora-sample."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_cli.sampling.run import SampleRequest, run_sampling
from lora_cli.toolbox.merge import merge_adapters
from tests.conftest import diffusers_image, read_for_base, run_command


def merge_cli(*args: str) -> subprocess.CompletedProcess:
    return run_command("merge", *args)


@pytest.fixture
def adapters(trained_adapters: dict[str, Path]) -> dict[str, Path]:
    return trained_adapters


def unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def test_lora_merge_equals_diffusers_fuse_lora(tiny_sd: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    for kind in ("lora", "locon"):
        out = tmp_path / kind
        result = merge_adapters(tiny_sd, [(adapters[kind], 1.0)], out)
        assert result.merged_layers > 0
        pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
        pipe.load_lora_weights(str(adapters[kind]))
        pipe.fuse_lora()
        fused = {f"{n}": p for n, p in pipe.unet.named_parameters() if n.endswith(".weight")}
        merged = unet_weights(out)
        changed = 0
        for name, value in merged.items():
            reference = fused.get(name.replace(".weight", ".base_layer.weight"), fused.get(name))
            if reference is None:
                continue
            torch.testing.assert_close(value, reference.detach(), rtol=1e-5, atol=1e-6)
            changed += not torch.equal(value, unet_weights(tiny_sd)[name])
        assert changed == result.merged_layers


def test_several_adapters_with_weights_any_algorithm(tiny_sd: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    from lora_cli.adapters.functional import delta_weight

    base = unet_weights(tiny_sd)
    out = tmp_path / "several"
    merge_adapters(tiny_sd, [(adapters["loha"], 0.5), (adapters["lokr"], -0.7)], out)
    merged = unet_weights(out)
    expected = {k: v.clone() for k, v in base.items()}
    for path, weight in ((adapters["loha"], 0.5), (adapters["lokr"], -0.7)):
        for (_, module), named in read_for_base(path, tiny_sd).tensors.items():
            key = f"{module}.weight"
            expected[key] = expected[key] + weight * delta_weight(named, base[key].shape)
    for key, value in merged.items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6)
    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as handle:
        record = json.loads(handle.metadata()["lora_cli.merged"])
    assert [(r["file"], r["weight"]) for r in record] == [("loha.safetensors", 0.5), ("lokr.safetensors", -0.7)]
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").is_file() and (out / "tokenizer").is_dir()


@pytest.mark.parametrize("kind", ["lora", "dora", "loha"])
def test_merged_model_draws_what_base_plus_adapter_draws(kind, tiny_sd: Path, adapters, tmp_path: Path) -> None:
    merged = tmp_path / "merged"
    merge_adapters(tiny_sd, [(adapters[kind], 1.0)], merged)
    console = Console(quiet=True)
    common = {"prompts": ["a yellow star"], "steps": 3, "size": 64, "seed": 3}
    with_adapter = run_sampling(
        SampleRequest(base=str(tiny_sd), out=tmp_path / "a", adapters=[(adapters[kind], 1.0)], **common), console
    )
    from_merged = run_sampling(SampleRequest(base=str(merged), out=tmp_path / "b", **common), console)
    a = np.asarray(Image.open(with_adapter[0]), dtype=np.int16)
    b = np.asarray(Image.open(from_merged[0]), dtype=np.int16)
    assert np.abs(a - b).max() <= 1  # identical float32 weights; at most 8-bit rounding differs


def test_merge_errors_are_one_line(tiny_sd: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    stray = tmp_path / "stray.safetensors"
    save_file(
        {
            "lora_unet_nowhere.lora_down.weight": torch.zeros(2, 2),
            "lora_unet_nowhere.lora_up.weight": torch.zeros(2, 2),
        },
        str(stray),
    )
    huge = tmp_path / "huge.safetensors"
    tensors = load_file(str(adapters["lora"]))
    save_file({k: v * 1e38 if "lora_up" in k else v for k, v in tensors.items()}, str(huge))
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04junk")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(Path(adapters["lora"]).read_bytes()[:-50])
    cases = [
        ([str(tiny_sd), str(stray), str(tmp_path / "o1")], "none of its 1 layers matches this stable-diffusion base"),
        ([str(tiny_sd), f"{huge}:1e10", str(tmp_path / "o2")], "non-finite"),
        (
            [str(tmp_path / "model.ckpt"), str(adapters["lora"]), str(tmp_path / "o3")],
            "is a pickle-based checkpoint, which can run code",
        ),
        ([str(tiny_sd), str(cut), str(tmp_path / "o4")], "damaged safetensors"),
        ([str(tiny_sd), str(adapters["lora"]), str(tiny_sd)], "already exists"),
        ([str(tiny_sd), str(adapters["lora"])], "usage: lora-merge BASE"),
    ]
    for args, message in cases:
        result = merge_cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr.strip().splitlines()[-1] and "Traceback" not in result.stderr, result.stderr
        assert not any(p.name.startswith(".o") for p in tmp_path.iterdir()), "temporary output left behind"
    mixed = tmp_path / "mixed.safetensors"
    save_file({**tensors, **load_file(str(stray))}, str(mixed))
    refused = merge_cli(str(tiny_sd), str(mixed), str(tmp_path / "o5"))
    assert refused.returncode == 2 and "1 adapter layer(s) match nothing" in refused.stderr
    partial = merge_cli(str(tiny_sd), str(mixed), str(tmp_path / "o5"), "--allow-partial")
    assert partial.returncode == 0 and "1 layer(s) matched nothing and were skipped" in partial.stderr
    nothing = merge_cli(str(tiny_sd), str(stray), str(tmp_path / "o6"), "--allow-partial")
    assert nothing.returncode == 2 and "none of its 1 layers matches" in nothing.stderr


def test_stacked_mixed_algorithms_match_merging_both(tiny_sd: Path, adapters, tmp_path: Path) -> None:
    """A LoRA and a LoHa together (weight patching, since peft cannot mix them on a layer) vs. merging both."""
    from lora_cli.sampling.switcher import uses_bypass

    def files(*kinds: str) -> list:
        return [read_for_base(adapters[kind], tiny_sd) for kind in kinds]

    pair = [adapters["lora"], adapters["loha"]]
    assert not uses_bypass(files("lora", "loha")) and not uses_bypass(files("lora", "dora"))
    assert uses_bypass(files("lora"))

    merged = tmp_path / "merged"
    merge_adapters(tiny_sd, [(adapters["lora"], 0.7), (adapters["loha"], 0.5)], merged)
    common = {"prompts": ["a red circle"], "steps": 3, "size": 64, "seed": 5}
    console = Console(quiet=True)
    stacked = run_sampling(
        SampleRequest(
            base=str(tiny_sd), out=tmp_path / "a", adapters=[(pair[0], 0.7), (pair[1], 0.5)], stack=True, **common
        ),
        console,
    )
    from_merged = run_sampling(SampleRequest(base=str(merged), out=tmp_path / "b", **common), console)
    difference = np.abs(
        np.asarray(Image.open(stacked[0]), dtype=np.int16) - np.asarray(Image.open(from_merged[0]), dtype=np.int16)
    )
    assert difference.max() <= 1


def info_cli(*args: str) -> subprocess.CompletedProcess:
    return run_command("info", *args)


def test_lora_info_describes_adapters_and_their_fit(tiny_sd: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    from lora_cli.builtin import builtin_path

    result = info_cli(str(adapters["locon"]), "--base", str(tiny_sd), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["layout"] == "kohya" and report["algorithm"] == "lora" and report["dora"] is False
    assert report["ranks"] == {"4": report["layers"] - report["ranks"].get("2", 0), **({"2": report["ranks"]["2"]})}
    assert report["alphas"]["2.0"] > 0 and report["alphas"]["1.0"] == report["ranks"]["2"]  # conv rank/alpha
    assert report["provenance"]["step"] == "3" and report["preset"]["adapter"]["type"] == "locon"
    assert report["fit"] == {
        "base": str(tiny_sd),
        "matched_layers": report["layers"],
        "unmatched_layers": [],
        "wrong_shape_layers": [],
        "fits": True,
        "same_base_as_training": True,
    }
    lokr = json.loads(info_cli(str(adapters["lokr"]), "--json").stdout)
    assert lokr["algorithm"] == "lokr" and lokr["ranks"] == {"4": lokr["layers"]}
    foreign = json.loads(info_cli(str(adapters["lora"]), "--base", str(builtin_path("shapes")), "--json").stdout)
    assert foreign["fit"]["fits"] is False and foreign["fit"]["same_base_as_training"] is False
    assert any("attn2.to_k" in layer for layer in foreign["fit"]["wrong_shape_layers"])  # cross-attention 32 vs 64
    missing = info_cli(str(tmp_path / "none.safetensors"))
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and "file not found" in missing.stderr


def test_extract_and_resize_recover_updates(tiny_sd: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    from lora_cli.adapters.functional import delta_weight
    from lora_cli.toolbox.lowrank import extract, resize

    base = unet_weights(tiny_sd)

    def deltas(path: Path) -> dict[str, torch.Tensor]:
        tensors = read_for_base(path, tiny_sd).tensors
        return {m: delta_weight(named, base[f"{m}.weight"].shape) for (_, m), named in tensors.items()}

    # Extract: a rank-4 LoRA merged into the base comes back exactly at rank 4.
    merged = tmp_path / "merged"
    merge_adapters(tiny_sd, [(adapters["lora"], 1.0)], merged)
    reports = extract(tiny_sd, merged, tmp_path / "extracted.safetensors", rank=4, energy=None)
    assert reports and min(r.energy for r in reports) > 0.9999
    original, recovered = deltas(adapters["lora"]), deltas(tmp_path / "extracted.safetensors")
    assert original.keys() == recovered.keys()
    for module in original:
        torch.testing.assert_close(recovered[module], original[module], rtol=1e-3, atol=2e-6)

    # Resize: LoHa (Hadamard rank <= 4 * 4) to a rank-16 LoRA is exact; to rank 2 keeps less energy.
    full = resize(adapters["loha"], tmp_path / "loha16.safetensors", 16, None, base=tiny_sd)
    assert min(r.energy for r in full) > 0.9999
    for module, delta in deltas(adapters["loha"]).items():
        torch.testing.assert_close(deltas(tmp_path / "loha16.safetensors")[module], delta, rtol=1e-3, atol=2e-6)
    small = resize(adapters["lora"], tmp_path / "lora2.safetensors", 2, None, base=None)
    assert all(r.rank == 2 for r in small) and max(r.energy for r in small) < 1.0
    with pytest.raises(Exception, match="DoRA layers depend on the base weights"):
        resize(adapters["dora"], tmp_path / "dora.safetensors", 4, None, base=None)
    by_energy = resize(adapters["lokr"], tmp_path / "lokr.safetensors", None, 0.9, base=tiny_sd)
    assert all(r.energy >= 0.9 for r in by_energy)


def convert_cli(*args: str) -> subprocess.CompletedProcess:
    return run_command("convert", *args)


@pytest.mark.parametrize("kind", ["lora", "locon", "dora"])
def test_convert_round_trips_exactly_and_diffusers_reads_it(kind, tiny_sd: Path, adapters, tmp_path: Path) -> None:

    original = adapters[kind]
    as_diffusers, back = tmp_path / "d.safetensors", tmp_path / "k.safetensors"
    first = convert_cli(str(original), str(as_diffusers), "--to", "diffusers")  # module names from our metadata
    assert first.returncode == 0, first.stderr
    assert all(k.startswith("unet.") for k in load_file(str(as_diffusers)))
    assert convert_cli(str(as_diffusers), str(back), "--to", "kohya").returncode == 0
    before, after = load_file(str(original)), load_file(str(back))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    def diffusers_draws(file: Path) -> np.ndarray:
        return diffusers_image(tiny_sd, file, "a red circle", 4)

    common = {"prompts": ["a red circle"], "steps": 3, "size": 64, "seed": 4}
    ours = run_sampling(
        SampleRequest(base=str(tiny_sd), out=tmp_path / "s", adapters=[(original, 1.0)], **common), Console(quiet=True)
    )[0]
    # diffusers reads the converted file as we read the original (it drops DoRA from kohya files, so DoRA
    # users who need diffusers convert to its layout).
    assert np.abs(diffusers_draws(as_diffusers) - np.asarray(Image.open(ours), dtype=np.int16)).max() <= 1
    if kind != "dora":
        assert np.abs(diffusers_draws(original) - diffusers_draws(as_diffusers)).max() <= 1


def test_convert_refusals(tiny_sd: Path, adapters, tmp_path: Path) -> None:
    loha = convert_cli(str(adapters["loha"]), str(tmp_path / "x.safetensors"), "--to", "diffusers")
    assert loha.returncode == 2 and "the diffusers layout cannot hold loha adapters; use kohya" in loha.stderr
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(adapters["lora"])), str(bare))  # no metadata: module names unknown
    refused = convert_cli(str(bare), str(tmp_path / "y.safetensors"), "--to", "diffusers")
    assert refused.returncode == 2 and "pass --base BASE" in refused.stderr
    with_base = convert_cli(str(bare), str(tmp_path / "y.safetensors"), "--to", "diffusers", "--base", str(tiny_sd))
    assert with_base.returncode == 0, with_base.stderr
