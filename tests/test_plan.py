"""The memory planner: breakdowns, directions, adapter sizes and activations against the real thing, advice,
sizes, and one real training run's peak RSS against the CPU estimate."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from lora_cli.config import load_preset
from lora_cli.config.schema import AdapterSection, ModelSection
from lora_cli.errors import ModelLoadError, PresetError
from lora_cli.planning import PlanSettings, estimate_memory, parse_size, read_inventory
from lora_cli.planning.advice import Budget, advise
from lora_cli.planning.report import format_advice, format_plan

MiB, GiB = 2**20, 2**30


@pytest.fixture(scope="module")
def shapes():
    return read_inventory(ModelSection(path="builtin:shapes"))


def settings(**changes) -> PlanSettings:
    values = {"adapter": AdapterSection(), "resolution": 256, "batch_size": 2, **changes}
    return PlanSettings(**values)


def part(plan, prefix: str) -> int:
    return sum(p.bytes for p in plan.device_parts if p.name.startswith(prefix))


@pytest.mark.parametrize("device", ["cuda", "cpu"])
@pytest.mark.parametrize("cached", [False, True])
def test_breakdown_sums_to_the_peaks(shapes, device: str, cached: bool) -> None:
    plan = estimate_memory(shapes, settings(cache_latents=cached, cache_text_embeddings=cached), device)
    assert sum(p.bytes for p in plan.device_parts) == plan.peak_device_bytes
    assert sum(p.bytes for p in plan.ram_parts) == plan.peak_ram_bytes
    assert all(p.bytes >= 0 for p in (*plan.device_parts, *plan.ram_parts))
    if device == "cpu":
        assert plan.peak_device_bytes == plan.peak_ram_bytes
    weights = {p.name for p in plan.device_parts if p.name.startswith("weights:")}
    assert ("weights: vae" in weights) is (not cached or plan.device_phase == "cache")


def test_settings_move_the_estimate_the_right_way(shapes) -> None:
    base = settings()
    plan = estimate_memory(shapes, base)
    bigger_rank = estimate_memory(shapes, replace(base, adapter=AdapterSection(rank=32)))
    assert bigger_rank.adapter_parameters == 8 * plan.adapter_parameters
    assert bigger_rank.peak_device_bytes > plan.peak_device_bytes
    assert part(estimate_memory(shapes, replace(base, batch_size=4)), "activations") > part(plan, "activations")
    checkpointed = estimate_memory(shapes, replace(base, gradient_checkpointing=True))
    assert part(checkpointed, "activations") < part(plan, "activations") / 2
    half = estimate_memory(shapes, replace(base, dtype="bfloat16"))
    assert part(half, "weights: unet") == pytest.approx(part(plan, "weights: unet") / 2, rel=0.01)
    unet = [part(estimate_memory(shapes, replace(base, quantize=q)), "weights: unet") for q in ("none", "int8", "nf4")]
    assert unet[0] > unet[1] > unet[2]
    quantized = estimate_memory(shapes, replace(base, quantize="nf4"))
    assert quantized.peak_ram_bytes > plan.peak_ram_bytes  # the full-precision copy while quantizing
    optimizers = [
        part(estimate_memory(shapes, replace(base, optimizer=o)), "optimizer")
        for o in ("adamw8bit", "adamw", "prodigy")
    ]
    assert optimizers[0] <= optimizers[1] < optimizers[2]
    assert estimate_memory(shapes, replace(base, resolution=512)).peak_device_bytes > plan.peak_device_bytes


@pytest.mark.parametrize(
    "adapter",
    [
        {"rank": 4},
        {"type": "locon", "rank": 4, "conv_rank": 2},
        {"type": "loha", "rank": 4},
        {"type": "lokr", "rank": 4},
        {"rank": 8, "dora": True, "targets": "attention_ff", "late": 2},
        {"rank": 4, "text_encoder": True},
    ],
)
def test_adapter_parameters_match_real_injection(shapes, adapter: dict) -> None:
    from lora_cli.adapters.injection import inject_adapter
    from lora_cli.models import load_base

    section = AdapterSection(**adapter)
    base = load_base(ModelSection(path="builtin:shapes"))
    injected = inject_adapter(base, section, seed=0)
    plan = estimate_memory(shapes, settings(adapter=section))
    assert plan.adapter_parameters == injected.trainable_count()
    assert plan.adapted_layers == sum(len(names) for names in injected.targets.values())


@pytest.mark.parametrize("targets", ["attention", "full"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_count_matches_what_autograd_saves(targets: str, checkpointing: bool) -> None:
    """The analytic count of saved activations against the bytes autograd actually keeps (UNet only)."""
    import torch

    from lora_cli.adapters.injection import inject_adapter
    from lora_cli.models import load_base
    from lora_cli.planning.activations import DenoiserQuery, unet_activations
    from lora_cli.planning.adapter_size import adaptable_layers, select_targets

    section = AdapterSection(targets=targets)
    base = load_base(ModelSection(path="builtin:shapes"))
    injected = inject_adapter(base, section, seed=0)
    unet = base.denoiser
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    params = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    latents, context = torch.randn(1, 4, 32, 32), torch.randn(1, 16, unet.config.cross_attention_dim)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        unet(latents, torch.tensor([500]), encoder_hidden_states=context)

    inventory = read_inventory(ModelSection(path="builtin:shapes"))
    layers = adaptable_layers(inventory.layer_shapes("unet"))
    names = select_targets(layers, section, base.architecture.target_presets, [], "unet")
    assert set(names) == set(injected.targets["unet"])
    query = DenoiserQuery(layers, frozenset(names), 4, "lora", False, 32 * 32, 16)
    counted = unet_activations(query)
    elements = counted.checkpointed if checkpointing else counted.saved
    assert 4 * elements == pytest.approx(sum(saved.values()), rel=0.1)


def test_advice_makes_a_tight_budget_fit_and_says_when_nothing_can(shapes) -> None:
    start = settings(resolution=512, batch_size=4)
    plan = estimate_memory(shapes, start)
    budget = Budget(vram=plan.peak_device_bytes - 200 * MiB, ram=64 * GiB)
    advice = advise(shapes, start, budget)
    assert advice.fits and advice.changes
    assert advice.changes[-1].peak_device_bytes <= budget.vram
    peaks = [plan.peak_device_bytes, *(change.peak_device_bytes for change in advice.changes)]
    assert peaks == sorted(peaks, reverse=True)
    text = format_advice(advice)
    assert advice.changes[0].line() in text and "fits" in text

    impossible = advise(shapes, start, Budget(vram=1 * MiB))
    assert not impossible.fits and impossible.message.startswith("cannot fit")
    assert {key for change in impossible.changes for key in change.updates} >= {
        "train.gradient_checkpointing",
        "model.quantize",
        "data.resolution",
    }
    roomy = advise(shapes, start, Budget(vram=80 * GiB, ram=80 * GiB))
    assert roomy.fits and not roomy.changes


def test_ram_budget_on_the_cpu_and_the_text_report(shapes) -> None:
    start = settings(resolution=512, batch_size=4)
    plan = estimate_memory(shapes, start, "cpu")
    advice = advise(shapes, start, Budget(ram=plan.peak_ram_bytes - 50 * MiB), "cpu")
    assert advice.fits and all("VRAM" not in change.line() for change in advice.changes)
    assert "mixed_precision" not in format_advice(advice)
    text = format_plan(plan)
    assert "RAM peak" in text and "GPU memory" not in text and "activations" in text
    assert "GPU memory peak" in format_plan(estimate_memory(shapes, start, "cuda"))
    with pytest.raises(ValueError, match="cuda"):
        advise(shapes, start, Budget(vram=GiB), "cpu")


@pytest.mark.parametrize(
    ("text", "size"),
    [("12GiB", 12 * GiB), ("16 GB", 16 * 10**9), ("800MiB", 800 * MiB), ("1.5gib", 3 * GiB // 2), ("4096", 4096)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["12 potatoes", "", "GiB", "-1GB", "0", "1e9"])
def test_parse_size_refuses_with_one_line(text: str) -> None:
    with pytest.raises(PresetError) as caught:
        parse_size(text, "--vram")
    message = str(caught.value)
    assert message.startswith("--vram: ") and repr(text) in message and "\n" not in message


def test_single_file_inventory_equals_the_folder(tiny_sd: Path, tmp_path: Path) -> None:
    from lora_cli.models.single_file_writer import write_single_file

    single = tmp_path / "tiny.safetensors"
    write_single_file(tiny_sd, single, {})
    folder = read_inventory(ModelSection(path=str(tiny_sd)))
    file = read_inventory(ModelSection(path=str(single)))
    assert set(file.components) == set(folder.components) == {"unet", "vae", "text_encoder"}
    for component in folder.components:
        assert file.parameters(component) == folder.parameters(component)
    assert file.layer_shapes("unet") == folder.layer_shapes("unet")
    assert file.pipeline_class == folder.pipeline_class == "StableDiffusionPipeline"


def test_unreadable_bases_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        read_inventory(ModelSection(path="someone/not-downloaded-model"))
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(ModelLoadError, match="convert it to .safetensors"):
        read_inventory(ModelSection(path=str(pickle)))


def test_plan_report_for_the_cli(write_preset) -> None:
    from lora_cli.planning.report import plan_report

    preset = load_preset(write_preset(data={"resolution": 512}, train={"batch_size": 8, "steps": 1}))
    plain = plan_report(preset, images=6)
    assert "GPU memory peak" in plain and "Training on the CPU only instead: RAM peak" in plain
    assert "fits" not in plain
    plan = estimate_memory(read_inventory(preset.model), PlanSettings.from_preset(preset, 6))
    advised = plan_report(preset, vram=plan.peak_device_bytes - 20 * MiB, images=6)
    assert "1. " in advised and "fits with" in advised


TRAIN_AND_REPORT_PEAK = """
from lora_cli.cli.train import main
try:
    main()
except SystemExit as exit:
    if exit.code:
        raise
status = open("/proc/self/status").read()
print(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
"""


def test_cpu_estimate_is_within_25_percent_of_a_real_runs_peak_rss(write_preset, tmp_path: Path) -> None:
    """Train the tiny model for real in a fresh process and compare its peak RSS with the estimate."""
    from lora_cli.planning import plan_preset

    path = write_preset(train={"steps": 2, "batch_size": 2, "learning_rate": 1.0e-3})
    preset = load_preset(path)
    images = sum(1 for p in Path(preset.data.folder).iterdir() if p.suffix == ".png")
    estimate = plan_preset(preset, device="cpu", images=images).peak_ram_bytes

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # The child reports its own high-water mark (VmHWM): ru_maxrss of a process forked from this large test
    # process would include the pages it shared with it before exec.
    command = [sys.executable, "-c", TRAIN_AND_REPORT_PEAK, str(path), "--no-progress"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    measured = int(result.stdout.strip().splitlines()[-1]) * 1024
    assert abs(estimate / measured - 1) <= 0.25, f"estimate {estimate / MiB:.0f} MiB, measured {measured / MiB:.0f} MiB"
