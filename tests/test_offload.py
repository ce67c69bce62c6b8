"""Block offloading (`train.offload_blocks`): the same training as with every block resident, the weights away
from the device except while their block runs, and refusals where it cannot work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from lora_cli.training.offload import BlockOffloader
from tests.conftest import run_command


class Checkpointed(nn.Module):
    """Blocks run under gradient checkpointing, as a DiT runs its blocks when it is on."""

    def __init__(self, blocks: nn.ModuleList) -> None:
        super().__init__()
        self.blocks = blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False)
        return x


def test_offloaded_weights_are_present_only_while_their_block_runs() -> None:
    torch.manual_seed(0)
    blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16)) for _ in range(4))
    adapters = nn.ModuleList(nn.Linear(16, 16, bias=False) for _ in range(4))  # trainable, like an adapter
    for block, adapter in zip(blocks, adapters, strict=True):
        block.requires_grad_(False)
        block[0].register_forward_hook(lambda _m, args, out, a=adapter: out + a(args[0]))
    resident = Checkpointed(blocks)
    inputs = torch.randn(3, 16)
    resident(inputs).square().sum().backward()
    expected = [adapter.weight.grad.clone() for adapter in adapters]
    adapters.zero_grad()

    offloader = BlockOffloader(list(blocks[2:]), torch.device("cpu"))
    seen = []
    for index, block in enumerate(blocks[2:]):  # its first layer runs while the block does
        block[0].register_forward_pre_hook(lambda *_, i=index: seen.append((i, offloader.on_device(i))))
    assert not offloader.on_device(0) and blocks[2][0].weight.numel() == 0  # away until the block runs
    assert offloader.host_bytes == 2 * (2 * 16 * 16 + 2 * 16) * 4
    Checkpointed(blocks)(inputs).square().sum().backward()
    # forward, then the recomputation in backward, in reverse
    assert seen == [(0, True), (1, True), (1, True), (0, True)]
    assert not offloader.on_device(1)  # back on the host; the last one used waits for the next forward pass
    Checkpointed(blocks)(inputs)
    assert not offloader.on_device(0) and not offloader.on_device(1)
    for adapter, grad in zip(adapters, expected, strict=True):
        torch.testing.assert_close(adapter.weight.grad, grad, rtol=0, atol=0)


@pytest.fixture(scope="module")
def flux(tiny_base) -> Path:
    return tiny_base("flux")


@pytest.fixture(scope="module")
def wide_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64-wide layers: what 4-bit quantization takes."""
    from lora_cli.toy.tiny_dits import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("models") / "wide-flux", seed=0, heads=4)


def preset_sections(flux: Path, out: Path, offload: int, quantize: str = "none") -> dict:
    return {
        "model": {"path": str(flux), "max_text_tokens": 16, "quantize": quantize},
        "train": {"steps": 4, "learning_rate": "1e-2", "batch_size": 2, "gradient_checkpointing": True,
                  "offload_blocks": offload},
        "sample": {"prompts": ["a yellow star"], "every": 2, "steps": 2},
        "output": {"dir": str(out), "save_every": 2},
    }  # fmt: skip


@pytest.mark.parametrize("quantize", ["none", "fp8", "nf4"])
def test_an_offloaded_run_trains_exactly_as_a_resident_one(quantize, request, write_preset, tmp_path: Path) -> None:
    """Same losses and adapter with 2 blocks offloaded (previews and checkpoints on; quantized bases move their
    stored bytes), and a run resumed from its step-2 checkpoint ends with the same adapter."""
    import json

    flux = request.getfixturevalue("wide_flux" if quantize == "nf4" else "flux")
    runs = {}
    for offload in (0, 2):
        out = tmp_path / f"offload-{offload}"
        preset = write_preset(f"p{offload}.yaml", **preset_sections(flux, out, offload, quantize))
        result = run_command("train", str(preset), "--no-progress")
        assert result.returncode == 0, result.stderr[-2000:]
        losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[offload] = (losses, load_file(str(next(out.glob("*.safetensors")))), result.stdout + result.stderr)
    assert "offloading 2 of" in runs[2][2] and "offloading" not in runs[0][2]
    assert runs[0][0] == runs[2][0]
    for key, value in runs[0][1].items():
        assert torch.equal(value, runs[2][1][key]), key
    resumed = tmp_path / "resumed"
    preset = write_preset("resume.yaml", **preset_sections(flux, resumed, 2, quantize))
    checkpoint_dir = tmp_path / "offload-2" / "checkpoints" / "step-000002"
    result = run_command("train", str(preset), "--no-progress", "--resume-from", str(checkpoint_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    final = load_file(str(next(resumed.glob("*.safetensors"))))
    for key, value in runs[2][1].items():
        assert torch.equal(value, final[key]), key


@pytest.mark.parametrize(
    ("train", "extra", "message"),
    [
        ({"offload_blocks": 1}, {}, "needs `train.gradient_checkpointing: true`"),
        ({"offload_blocks": 1, "gradient_checkpointing": True, "compile": True}, {}, "do not mix"),
        ({"offload_blocks": 1, "gradient_checkpointing": True}, {"distributed": {"strategy": "fsdp"}},
         "cannot offload FSDP shards"),
        ({"offload_blocks": 99, "gradient_checkpointing": True}, {}, "has 2 blocks"),
        ({"offload_blocks": 1, "gradient_checkpointing": True}, {"model": {"quantize": "int8"}},
         "does not work with `model.quantize: int8`"),
    ],
)  # fmt: skip
def test_offloading_is_refused_where_it_cannot_work(train, extra, message, flux, write_preset) -> None:
    extra = dict(extra)
    model = {"path": str(flux), "max_text_tokens": 16, **extra.pop("model", {})}
    preset = write_preset(model=model, train=train, **extra)
    result = run_command("train", str(preset), "--no-progress")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and message in lines[-1], result.stderr[-1000:]


def test_a_unet_is_refused_in_one_line(write_preset) -> None:
    result = run_command("train", str(write_preset(train={"offload_blocks": 1, "gradient_checkpointing": True})))
    assert (
        result.returncode == 2
        and "offloading covers the diffusion-transformer bases" in result.stderr.strip().splitlines()[-1]
    )


@pytest.fixture(scope="module")
def deep_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lora_cli.toy.tiny_dits import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("models") / "deep-flux", seed=0, blocks=(2, 4))


def test_the_planner_counts_what_offloading_moves(deep_flux: Path) -> None:
    """The bytes the planner takes off the GPU are the bytes the offloader holds on the host (fp8 too); the GPU
    keeps two blocks at once; the copies' time follows from the stated bandwidth."""
    from dataclasses import replace

    from lora_cli.config.schema import AdapterSection, ModelSection
    from lora_cli.models import load_base
    from lora_cli.planning import PlanSettings, estimate_memory, read_inventory
    from lora_cli.training.offload import offload_denoiser

    inventory = read_inventory(ModelSection(path=str(deep_flux)))
    for quantize in ("none", "fp8"):
        start = PlanSettings(adapter=AdapterSection(), resolution=64, gradient_checkpointing=True, quantize=quantize)
        resident = estimate_memory(inventory, start)
        offloaded = estimate_memory(inventory, replace(start, offload_blocks=4, host_link_gbps=10.0))
        pinned = offloaded.offloaded_bytes
        base = load_base(ModelSection(path=str(deep_flux), quantize=quantize))
        held = offload_denoiser(base, 4, torch.device("cpu"))
        assert pinned == pytest.approx(held.host_bytes, rel=0.01)
        on_gpu = {part.name: part.bytes for part in offloaded.device_parts}
        weights = {part.name: part.bytes for part in resident.device_parts}["weights: transformer"]
        assert on_gpu["weights: transformer (without 4 offloaded blocks)"] == weights - pinned
        assert 0 < on_gpu["offloaded blocks on the GPU at once (2: running, prefetched)"] < pinned
        note = next(note for note in offloaded.notes if note.startswith("offloading 4 blocks"))
        assert f"{2 * pinned / 10e9:.2f} s at 10 GB/s" in note
    # The advice's offloading options: fewest blocks first, with checkpointing; none on the CPU or under FSDP.
    from lora_cli.planning.advice import _offload

    settings = PlanSettings(adapter=AdapterSection(), offloadable_blocks=6, offload_blocks=1)
    options = [updates for updates, _ in _offload(settings, "cuda")]
    assert options == [{"train.offload_blocks": n, "train.gradient_checkpointing": True} for n in range(2, 7)]
    assert not list(_offload(settings, "cpu")) and not list(_offload(replace(settings, sharded=True), "cuda"))


def test_flux_dev_headers_plan_to_8_gib_with_nf4_and_offloading(tmp_path: Path, shapes_data: Path) -> None:
    """FLUX.1-dev's real shapes (headers only, sparse files): at 512 px, rank 16, batch 1 the advice for 8 GiB is
    nf4 plus offloaded blocks, T5-XXL streaming while it encodes the captions."""
    from benchmarks.shaped_headers import flux_dev
    from lora_cli.config import load_preset
    from lora_cli.planning import plan_report

    base = flux_dev(tmp_path / "flux-dev")
    overrides = [f"model.path={base}", f"data.folder={shapes_data}", "data.resolution=512", "model.quantize=none"]
    preset = Path(__file__).resolve().parents[1] / "presets" / "flux-nf4.yaml"
    report = plan_report(load_preset(preset, overrides), vram=8 * 2**30)
    advice = report.splitlines()[-4:]
    assert advice[0].startswith("1. model.quantize: nf4") and advice[1].startswith("2. train.offload_blocks: ")
    assert advice[2].startswith("fits with 2 change(s)")
    # the advice as `--set` values: the preset they make plans within the budget
    sets = advice[3].removeprefix("to train so: add ").split(" to the lora-train command")[0].split()
    assert sets[0::2] == ["--set", "--set"] and sets[1] == "model.quantize=nf4"
    advised = load_preset(preset, [*overrides, *sets[1::2]])
    assert advised.model.quantize == "nf4" and advised.train.offload_blocks > 0
    assert plan_report(advised, vram=8 * 2**30).splitlines()[-1].startswith("fits: VRAM 7.")


def test_a_gpu_runs_ram_counts_pinned_copies_but_not_file_pages_read_once(tmp_path: Path) -> None:
    """FLUX.1-dev's shapes in nf4 with 4 offloaded blocks on a GPU: RAM peaks while the caches fill, the quantized
    transformer waiting on the host and T5-XXL's blocks in pinned memory; the bf16 files read on the way (T5's,
    the full-precision transformer quantizing reads) are file pages, so 32 GiB of RAM is enough. Without caches
    T5's pinned blocks stay for training; a base converted to another dtype needs its full-precision copy."""
    from dataclasses import replace

    from benchmarks.shaped_headers import flux_dev
    from lora_cli.config.schema import AdapterSection, ModelSection
    from lora_cli.planning import Budget, PlanSettings, advise, estimate_memory, read_inventory

    gib = 2**30
    inventory = read_inventory(ModelSection(path=str(flux_dev(tmp_path / "flux-dev"))))
    ready = PlanSettings(
        adapter=AdapterSection(rank=16, targets="attention"), resolution=512, batch_size=1, dtype="bfloat16",
        gradient_checkpointing=True, mixed_precision="bf16", quantize="nf4", optimizer="adamw8bit",
        cache_latents=True, cache_text_embeddings=True, offload_blocks=4,
    )  # fmt: skip
    plan = estimate_memory(inventory, ready)
    parts = {part.name: part for part in plan.ram_parts}
    assert plan.ram_phase == "cache"
    assert 8 * gib < parts["weights: text_encoder_2 (24 blocks in pinned host memory)"].bytes < 9 * gib
    assert 5 * gib < parts["weights: transformer (quantized, until it moves to the GPU)"].bytes < 6 * gib
    assert parts["weights: text_encoder_2 (file read on the way to the GPU)"].file_pages
    assert plan.peak_ram_bytes == sum(part.bytes for part in plan.ram_parts if not part.file_pages) < 17 * gib
    assert plan.peak_resident_bytes > plan.peak_ram_bytes + 10 * gib  # the 22 GiB file quantizing reads
    start = replace(ready, quantize="none", offload_blocks=0)
    assert advise(inventory, start, Budget(vram=8 * gib, ram=32 * gib)).fits

    # Text not cached: when the denoiser moves to the GPU its nf4 copy, its offloaded blocks' pinned copies and
    # T5's pinned blocks are all in RAM.
    uncached = estimate_memory(inventory, replace(ready, cache_text_embeddings=False))
    names = {part.name for part in uncached.ram_parts}
    assert uncached.ram_phase == "start" and "weights: text_encoder_2 (24 blocks in pinned host memory)" in names
    assert {"offloaded blocks (pinned host memory, 4 blocks)", "weights: transformer (quantized, until it moves to "
            "the GPU)"} <= names and uncached.peak_ram_bytes > plan.peak_ram_bytes  # fmt: skip
    converted = estimate_memory(inventory, replace(ready, dtype="float16"))
    assert converted.ram_phase == "load" and converted.peak_ram_bytes > 22 * gib
    # int8 waits on the host in full precision (bitsandbytes quantizes it on the move): file pages when mapped
    int8 = estimate_memory(inventory, replace(ready, quantize="int8", offload_blocks=0))
    waiting = next(part for part in int8.ram_parts if part.name.startswith("weights: transformer"))
    assert waiting.file_pages and waiting.bytes > 22 * gib


def test_flux_dev_headers_plan_the_issues_budgets(tmp_path: Path, shapes_data: Path) -> None:
    """The settings `benchmarks/offload_gpu.py` measures on a GPU, chosen by the planner for FLUX.1-dev's shapes
    (rank 16, 512 px, batch 1): nf4 with offloaded blocks in 8 GiB, fp8 in 12 GiB and bf16 in 16 GiB, each with
    the fewest offloaded blocks whose plan fits, which one block fewer does not."""
    from benchmarks.offload_gpu import SETTINGS, plan_of, setting_overrides
    from benchmarks.shaped_headers import flux_dev

    base = flux_dev(tmp_path / "flux-dev")
    common = [f"model.path={base}", f"data.folder={shapes_data}", "data.resolution=512"]
    budgets = {setting.vram_gib: setting for setting in SETTINGS if setting.vram_gib}
    expected = {8: "nf4", 12: "fp8", 16: "none"}
    for vram, quantize in expected.items():
        chosen = setting_overrides(budgets[vram], common, small=False)
        settings = dict(item.split("=", 1) for item in chosen)
        blocks = int(settings["train.offload_blocks"])
        assert settings["model.quantize"] == quantize and blocks > 0
        fixed = [*common, f"model.quantize={quantize}"]
        one_fewer = plan_of([*fixed, f"train.offload_blocks={blocks - 1}"]).peak_device_bytes
        assert plan_of([*fixed, f"train.offload_blocks={blocks}"]).peak_device_bytes <= vram * 2**30 < one_fewer


def test_prior_images_are_drawn_with_the_blocks_offloaded(flux: Path, write_preset, tmp_path: Path) -> None:
    """Prior images are drawn before training with the same offloading (the whole denoiser never moves at once)
    and equal the ones a resident run draws; the run then trains as the resident one does."""
    drawn = {}
    for offload in (0, 2):
        out = tmp_path / f"prior-{offload}"
        sections = preset_sections(flux, out, offload)
        sections["prior"] = {"prompts": ["a red circle"], "images_per_prompt": 2, "steps": 2}
        sections["train"]["steps"] = 2
        result = run_command("train", str(write_preset(f"prior{offload}.yaml", **sections)), "--no-progress")
        assert result.returncode == 0, result.stderr[-2000:]
        images = sorted(out.glob("prior/*/prior_*.png"))
        drawn[offload] = ([image.read_bytes() for image in images], load_file(str(next(out.glob("*.safetensors")))))
    assert len(drawn[0][0]) == 2 and drawn[0][0] == drawn[2][0]
    for key, value in drawn[0][1].items():
        assert torch.equal(value, drawn[2][1][key]), key


def test_released_text_encoders_take_their_streamed_copies_with_them(flux: Path, write_preset, tmp_path) -> None:
    """Once the caches are full the text encoders are released, and their streamed blocks' host copies (T5-XXL's
    9 GiB of pinned memory on a GPU) go with them at once: no reference cycle keeps them for the garbage collector."""
    import gc
    import weakref

    from lora_cli.config import load_preset
    from lora_cli.training.offload import repeated_blocks
    from lora_cli.training.session import build_session, prepare_model, run_paths, scan_dataset

    sections = preset_sections(flux, tmp_path / "out", offload=2)
    sections |= {"cache": {"latents": True, "text_embeddings": True}, "sample": {"prompts": []}}
    preset = load_preset(write_preset(**sections))
    base, adapter, data = prepare_model(preset, scan_dataset(preset))
    blocks = [weakref.ref(block) for encoder in base.text_encoders.values() for block in repeated_blocks(encoder)]
    assert blocks
    gc.disable()
    try:
        session = build_session(preset, run_paths(preset), base, adapter, data)
        assert not session.base.text_encoders
        assert not [block for block in blocks if block() is not None]
    finally:
        gc.enable()
