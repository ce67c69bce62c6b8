"""Few-step distillation: the consistency pieces against diffusers' schedulers, training from prompts alone,
the recorded sampler, diffusers drawing what lora-sample draws with LCM, stacking, resume, and reflow lowering
the few-step error against the teacher on a tiny flow model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from rich.console import Console

from lora_cli.diffusion.consistency import (
    SkippingSolver,
    boundary_scalings,
    clean_and_noise,
    consistency_output,
    pseudo_huber,
)
from tests.conftest import diffusers_image, invoke, train_preset

PROMPTS = ["a red circle", "a yellow star"]


@pytest.fixture(scope="module")
def ddim_scheduler(tiny_sd: Path):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_pretrained(tiny_sd, subfolder="scheduler")


def test_solver_timesteps_are_the_ones_lcm_scheduler_samples_from(ddim_scheduler) -> None:
    from diffusers import LCMScheduler

    solver = SkippingSolver.for_scheduler(ddim_scheduler.alphas_cumprod, 50)
    lcm = LCMScheduler.from_config(ddim_scheduler.config, original_inference_steps=50)
    for steps in (1, 2, 4, 8):
        lcm.set_timesteps(steps)
        assert set(lcm.timesteps.tolist()) <= set(solver.timesteps.tolist()), steps
    assert solver.timesteps[0] == 19 and solver.timesteps[-1] == 999 and solver.skip == 20


def test_one_solver_step_is_diffusers_ddim_step(ddim_scheduler) -> None:
    """The teacher's skipping step equals DDIMScheduler.step (eta 0) with the solver's interval, down to the
    last step, which lands on alpha_bar[0] as DDIM's final step does without set_alpha_to_one."""
    solver = SkippingSolver.for_scheduler(ddim_scheduler.alphas_cumprod, 50)
    ddim_scheduler.set_timesteps(50)
    generator = torch.Generator().manual_seed(0)
    for t in (999, 519, 19):
        sample, output = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 4, 8, 8, generator=generator)
        timestep = torch.tensor([t])
        alpha, sigma = solver.scales(timestep, sample)
        x0, eps = clean_and_noise(output, "epsilon", sample, alpha, sigma)
        ours = solver.step(x0, eps, timestep)
        theirs = ddim_scheduler.step(output, t, sample, eta=0.0).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_each_prediction_type_gives_back_the_clean_sample_and_noise(ddim_scheduler, prediction_type) -> None:
    generator = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([99, 799])
    noisy = ddim_scheduler.add_noise(x0, noise, timesteps)
    target = {"epsilon": noise, "sample": x0, "v_prediction": ddim_scheduler.get_velocity(x0, noise, timesteps)}
    solver = SkippingSolver.for_scheduler(ddim_scheduler.alphas_cumprod, 50)
    alpha, sigma = solver.scales(timesteps, noisy)
    clean, eps = clean_and_noise(target[prediction_type], prediction_type, noisy, alpha, sigma)
    torch.testing.assert_close(clean, x0, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(eps, noise, rtol=1e-3, atol=1e-3)


def test_the_consistency_function_is_the_identity_at_time_zero_and_matches_lcm_scheduler(ddim_scheduler) -> None:
    from diffusers import LCMScheduler

    c_skip, c_out = boundary_scalings(torch.tensor([0]), torch.zeros(1, 1))
    assert c_skip.item() == 1 and c_out.item() == 0
    solver = SkippingSolver.for_scheduler(ddim_scheduler.alphas_cumprod, 50)
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    output = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(consistency_output(output, "epsilon", sample, torch.tensor([0]), solver), sample)
    lcm = LCMScheduler.from_config(ddim_scheduler.config)  # one step from 999: its denoised output is ours
    lcm.set_timesteps(1)
    theirs = lcm.step(output, int(lcm.timesteps[0]), sample).denoised
    ours = consistency_output(output, "epsilon", sample, lcm.timesteps[:1], solver)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_pseudo_huber_is_zero_for_equal_tensors_and_near_l1_far_away() -> None:
    a = torch.zeros(2, 3)
    assert torch.equal(pseudo_huber(a, a, 0.001), torch.zeros(2))
    assert pseudo_huber(a, a + 5, 0.001).sub(5).abs().max() < 0.01


def _distill_preset(tmp_path: Path, base: Path, **sections: dict) -> dict:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    raw = {
        "model": {"path": str(base)},
        "data": {"resolution": 64},
        "adapter": {"rank": 4, "alpha": 4},
        "distill": {"prompts": str(prompts), "teacher_images": 2, "teacher_steps": 3, "teacher_guidance": 4.0},
        "train": {"objective": "distill", "steps": 3, "batch_size": 2, "learning_rate": 1e-2},
        "cache": {"latents": True, "text_embeddings": True},
        "output": {"dir": str(tmp_path / "run"), "name": "fast"},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


@pytest.fixture(scope="module")
def lcm_adapter(tiny_sd: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A consistency-distillation adapter of the tiny SD base, trained from a prompts file alone."""
    raw = _distill_preset(tmp_path_factory.mktemp("lcm"), tiny_sd, train={"steps": 4, "learning_rate": 5e-2},
                          adapter={"targets": "full"})  # fmt: skip
    return train_preset(raw, "distill")


def test_prompts_alone_train_an_adapter_that_records_its_sampler(lcm_adapter: Path) -> None:
    from lora_cli.adapters.files import adapter_metadata
    from lora_cli.sampling.schedulers import Sampler

    teacher = sorted((lcm_adapter.parent / "teacher").glob("*/teacher_*.png"))
    assert len(teacher) == 2 * len(PROMPTS)  # drawn by the base, cached in the run folder
    captions = sorted(path.with_suffix(".txt").read_text().strip() for path in teacher)
    assert captions == sorted(PROMPTS * 2)
    assert Sampler.from_metadata(adapter_metadata(lcm_adapter)) == Sampler("lcm", 4, 1.0, 50)


def test_lora_sample_draws_with_the_recorded_sampler_and_diffusers_draws_the_same(
    tiny_sd: Path, lcm_adapter: Path, tmp_path: Path
) -> None:
    result = invoke(
        "sample", "--base", str(tiny_sd), "--adapter", str(lcm_adapter), "--prompt", "a yellow star", "--seed", "7",
        "--size", "64", "--out", str(tmp_path / "ours"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "distilled for 4 steps (lcm scheduler, guidance 1)" in " ".join(result.stderr.split())
    drawn = sorted((tmp_path / "ours").glob("000-*.png"))[0]
    assert "Sampler: lcm, CFG scale: 1.0" in Image.open(drawn).text["parameters"]
    ours = np.asarray(Image.open(drawn).convert("RGB"), dtype=np.int16)
    theirs = diffusers_image(tiny_sd, lcm_adapter, "a yellow star", 7, steps=4, guidance_scale=1.0,
                             scheduler="LCMScheduler")  # fmt: skip
    base = diffusers_image(tiny_sd, None, "a yellow star", 7, steps=4, guidance_scale=1.0, scheduler="LCMScheduler")
    assert np.abs(ours - theirs).max() <= 1, np.abs(ours - theirs).max()
    assert np.abs(ours - base).max() > 10


def test_a_distillation_adapter_stacks_with_a_concept_adapter(
    tiny_sd: Path, lcm_adapter: Path, trained_adapters: dict[str, Path], tmp_path: Path
) -> None:
    result = invoke(
        "sample", "--base", str(tiny_sd), "--adapter", str(lcm_adapter), "--adapter", str(trained_adapters["lora"]),
        "--stack", "--compare", "--prompt", "a yellow star", "--size", "64", "--out", str(tmp_path / "stacked"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    base, stacked = (np.asarray(Image.open(p), dtype=np.int16) for p in sorted((tmp_path / "stacked").glob("000-*")))
    assert np.abs(stacked - base).max() > 10


def test_an_explicit_scheduler_wins_over_the_recorded_one(tiny_sd: Path, lcm_adapter: Path, tmp_path: Path) -> None:
    result = invoke(
        "sample", "--base", str(tiny_sd), "--adapter", str(lcm_adapter), "--prompt", "a red circle", "--size", "64",
        "--scheduler", "ddim", "--steps", "2", "--out", str(tmp_path / "ddim"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "distilled" not in result.stderr
    drawn = sorted((tmp_path / "ddim").glob("000-*.png"))[0]
    assert "Steps: 2, Sampler: ddim" in Image.open(drawn).text["parameters"]


@pytest.mark.parametrize("target", ["student", "ema"])
def test_an_interrupted_distillation_resumes_exactly(tiny_sd: Path, tmp_path: Path, target: str) -> None:
    from lora_cli.config import validate_preset
    from lora_cli.training.run import train

    def run(folder: str, steps: int, resume: bool = False) -> Path:
        output = {"dir": str(tmp_path / folder), "save_every": 2}
        raw = _distill_preset(tmp_path, tiny_sd, distill={"target": target}, train={"steps": steps}, output=output)
        return train(validate_preset(raw, folder), Console(quiet=True), resume=resume, show_progress=False)

    whole = run("whole", 4)
    run("split", 2)
    resumed = run("split", 4, resume=True)
    from safetensors.torch import load_file

    one, two = load_file(whole), load_file(resumed)
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=0, atol=0)


def test_distillation_presets_are_refused_where_they_cannot_work(tiny_sd: Path, tmp_path: Path) -> None:
    from lora_cli.config import validate_preset
    from lora_cli.errors import PresetError

    raw = _distill_preset(tmp_path, tiny_sd)
    for change, message in [
        ({"adapter": {"text_encoder": True}, "cache": {"text_embeddings": False}}, "trains the denoiser only"),
        ({"distill": {"teacher_images": 0}}, "`data.folder` is missing"),
        ({"train": {"objective": "denoise"}}, "`data.folder` is missing"),
        ({"distill": {"guidance": [6, 2]}}, "low <= high"),
    ]:
        changed = {section: {**raw.get(section, {}), **values} for section, values in change.items()}
        with pytest.raises(PresetError, match=message):
            validate_preset({**raw, **changed}, "distill.yaml")


def test_lora_train_names_a_missing_prompts_file(tiny_sd: Path, tmp_path: Path) -> None:
    raw = _distill_preset(tmp_path, tiny_sd, distill={"prompts": str(tmp_path / "nowhere.txt")})
    preset = tmp_path / "preset.yaml"
    preset.write_text(yaml.safe_dump(raw))
    result = invoke("train", str(preset), "--no-progress")
    assert result.returncode != 0
    assert "distill.prompts:" in result.stderr and "nowhere.txt is not a file" in result.stderr
    assert "Traceback" not in result.stderr


def _euler_error(base: Path, adapter: Path | None, images: list[Path], seeds: list[int], steps: int) -> float:
    """Mean squared pixel error between the teacher's drawings and what the base (+ adapter) draws from the same
    seeds and prompts in `steps` steps."""
    from lora_cli.adapters.loading import load_adapter_file
    from lora_cli.config.schema import ModelSection
    from lora_cli.models import load_base
    from lora_cli.sampling import generate_images

    loaded = load_base(ModelSection(path=str(base), max_text_tokens=16))
    if adapter is not None:
        load_adapter_file(loaded.trainable_components(), loaded.architecture, adapter)
    prompts = [path.with_suffix(".txt").read_text().strip() for path in images]
    drawn = generate_images(loaded.architecture.build_pipeline(loaded), prompts, seeds, steps, 1.0, "", 64,
                            text_tokens=16)  # fmt: skip
    errors = [
        ((np.asarray(a, dtype=np.float32) - np.asarray(Image.open(b), dtype=np.float32)) ** 2).mean()
        for a, b in zip(drawn, images, strict=True)
    ]
    return float(np.mean(errors))


def test_reflow_lowers_the_few_step_error_against_the_teacher_on_a_flow_model(tiny_base, tmp_path: Path) -> None:
    sd3 = tiny_base("sd3")
    raw = _distill_preset(tmp_path, sd3, model={"path": str(sd3), "max_text_tokens": 16},
                          distill={"teacher_images": 2, "teacher_steps": 8, "teacher_guidance": 1.0},
                          adapter={"rank": 8, "alpha": 8, "targets": "full"},
                          train={"steps": 60, "learning_rate": 3e-3, "batch_size": 4})  # fmt: skip
    adapter = train_preset(raw, "reflow")
    from lora_cli.adapters.files import adapter_metadata
    from lora_cli.sampling.schedulers import Sampler

    assert Sampler.from_metadata(adapter_metadata(adapter)) == Sampler("default", 4, 1.0, None)
    images = sorted((adapter.parent / "teacher").glob("*/teacher_*.png"))
    seeds = [1234 + int(path.stem.split("_")[1]) for path in images]
    before = _euler_error(sd3, None, images, seeds, steps=2)
    after = _euler_error(sd3, adapter, images, seeds, steps=2)
    assert after < 0.7 * before, (before, after)


@pytest.mark.parametrize(
    ("base_name", "changes"),
    [
        ("sd", {"adapter": {"type": "loha"}}),
        ("sd", {"adapter": {"type": "lokr"}}),
        ("sd", {"adapter": {"dora": True}}),
        ("sd", {"model": {"quantize": "fp8"}}),
        ("sd", {"model": {"quantize": "nf4"}}),
        ("sdxl", {}),
        ("pixart", {}),
        ("flux", {}),
    ],
)
def test_every_algorithm_quantized_base_and_architecture_distils(tiny_base, tmp_path: Path, base_name, changes) -> None:
    """A few distillation steps train an adapter that changes what lora-sample draws with its recorded sampler."""
    from lora_cli.sampling.run import SampleRequest, run_sampling

    base = tiny_base(base_name)
    sections = {
        "model": {"path": str(base), "max_text_tokens": 16, **changes.get("model", {})},
        "adapter": {"rank": 4, "alpha": 4, "targets": "full", **changes.get("adapter", {})},
        "train": {"steps": 3, "learning_rate": 5e-2},
    }
    adapter = train_preset(_distill_preset(tmp_path, base, **sections), f"distill-{base_name}")
    quantize = changes.get("model", {}).get("quantize", "none")
    request = SampleRequest(base=str(base), prompts=["a red circle"], out=tmp_path / "drawn", size=64, seed=3,
                            adapters=[(adapter, 1.0)], compare=True, quantize=quantize)  # fmt: skip
    base_image, adapted = (np.asarray(Image.open(p), dtype=np.int16) for p in run_sampling(request, Console())[:2])
    assert np.abs(adapted - base_image).max() > 2


def test_a_v_prediction_base_distils_and_diffusers_draws_the_same_with_lcm(tiny_sd: Path, tmp_path: Path) -> None:
    import json
    import shutil

    base = tmp_path / "tiny-sd-v"
    shutil.copytree(tiny_sd, base)
    config_path = base / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "prediction_type": "v_prediction"}))
    raw = _distill_preset(tmp_path, base, adapter={"targets": "full"}, train={"steps": 3, "learning_rate": 5e-2})
    adapter = train_preset(raw, "distill-v")
    result = invoke(
        "sample", "--base", str(base), "--adapter", str(adapter), "--prompt", "a yellow star", "--seed", "7",
        "--size", "64", "--out", str(tmp_path / "ours"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    ours = np.asarray(Image.open(sorted((tmp_path / "ours").glob("000-*.png"))[0]).convert("RGB"), dtype=np.int16)
    theirs = diffusers_image(base, adapter, "a yellow star", 7, steps=4, guidance_scale=1.0, scheduler="LCMScheduler")
    assert np.abs(ours - theirs).max() <= 1, np.abs(ours - theirs).max()


def test_a_ddpm_scheduler_is_refused_for_a_flow_base(tiny_base, tmp_path: Path) -> None:
    result = invoke(
        "sample", "--base", str(tiny_base("sd3")), "--prompt", "a red circle", "--scheduler", "lcm",
        "--out", str(tmp_path / "drawn"),
    )  # fmt: skip
    assert result.returncode != 0
    assert "flow-matching base" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("preset", ["distill-quickstart.yaml", "distill-quickstart-dit.yaml"])
def test_short_distillation_quickstarts_write_an_adapter_with_its_sampler(tmp_path: Path, preset: str) -> None:
    from lora_cli.adapters.files import adapter_metadata
    from lora_cli.sampling.schedulers import Sampler

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "run"
    result = invoke(
        "train", str(root / "presets" / preset), "--no-progress",
        *("--set", "train.steps=3", "--set", "distill.teacher_images=1", "--set", "distill.teacher_steps=3"),
        *("--set", f"output.dir={out}"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (adapter,) = out.glob("*.safetensors")
    expected = "lcm" if preset == "distill-quickstart.yaml" else "default"
    assert Sampler.from_metadata(adapter_metadata(adapter)).scheduler == expected
    assert len(list((out / "teacher").rglob("teacher_*.png"))) == 9
