"""Preset sections of the training objectives: flow matching's noise levels and weighting, and distillation.

Every field's `description` is the reference text of docs/presets.md (a test keeps the two in step).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from lora_cli.config.section import Section


class FlowSection(Section):
    """Flow-matching settings (SD3, Flux, Wan); ignored by denoising-diffusion bases (SD1.x/2, SDXL, PixArt)."""

    timesteps: Literal["logit_normal", "uniform"] = Field(
        "logit_normal",
        description="How training noise levels (sigmas) are drawn: `logit_normal` (SD3 paper's default: more "
        "weight on middle noise levels) or `uniform`.",
    )
    logit_mean: float = Field(0.0, description="Mean of the logit-normal distribution.")
    logit_std: float = Field(1.0, gt=0, description="Standard deviation of the logit-normal distribution.")
    shift: float | Literal["auto"] | None = Field(
        None,
        description="Shift drawn sigmas towards noise: a number s maps sigma to s*sigma/(1+(s-1)*sigma); `auto` "
        "derives it from the image size (Flux's resolution-dependent shift). Default: the base's own "
        "(`auto` for Flux; the scheduler's shift for SD3 and Wan).",
    )
    weighting: Literal["none", "sigma_sqrt", "cosmap"] = Field(
        "none", description="Loss weighting over noise levels: `none`, `sigma_sqrt` or `cosmap` (SD3 paper)."
    )
    guidance: float = Field(
        1.0,
        ge=0,
        description="Guidance value fed to guidance-distilled models (Flux dev) while training; ignored by others.",
    )

    @field_validator("shift")
    @classmethod
    def _positive_shift(cls, value: float | str | None) -> float | str | None:
        if isinstance(value, float) and value <= 0:
            raise ValueError("flow.shift must be positive (or `auto`)")
        return value


class DistillSection(Section):
    """Few-step distillation (`train.objective: distill`): consistency distillation for DDPM bases, reflow for
    flow-matching bases. docs/distillation.md has the method and its references."""

    prompts: str | None = Field(
        None,
        description="A text file of prompts, one per line, for the teacher to draw `teacher_images` images of each "
        "(then `data.folder` may be left out). Without it the teacher draws for the dataset's captions.",
    )
    teacher_images: int = Field(
        0,
        ge=0,
        description="Images the teacher (the base) draws per prompt before training, cached under "
        "`output.dir/teacher/` and reused by later runs. 0: train on the dataset's images only. Reflow (flow "
        "bases) trains on these pairs of noise and drawn image only, so it needs at least 1.",
    )
    teacher_steps: int = Field(25, gt=0, description="Denoising steps of the teacher's drawings.")
    teacher_guidance: float | None = Field(
        None, ge=0, description="Guidance scale of the teacher's drawings. Default: the base pipeline's."
    )
    teacher_seed: int = Field(1234, description="Seed of the first teacher drawing (the rest count up).")
    guidance: tuple[float, float] = Field(
        (3.0, 8.0),
        description="Consistency distillation: the range the teacher's classifier-free guidance scale is drawn "
        "from at every step (the student learns the guided teacher and samples at guidance 1). Reflow ignores it "
        "(its teacher draws at `teacher_guidance`).",
    )
    solver_steps: int = Field(
        50,
        gt=1,
        description="Consistency distillation: timesteps of the teacher's skipping-step DDIM solver; the skip "
        "interval is the base's training timesteps (1000) / this. Sampling with `--scheduler lcm` uses the same.",
    )
    loss: Literal["huber", "l2"] = Field(
        "huber", description="Consistency distillation: pseudo-Huber (LCM-LoRA's) or squared-error distance."
    )
    huber_c: float = Field(0.001, gt=0, description="The pseudo-Huber loss's c.")
    target: Literal["student", "ema"] = Field(
        "student",
        description="Consistency distillation: the target network — the student itself without gradients "
        "(LCM-LoRA's choice) or an exponential moving average of its adapter.",
    )
    ema_decay: float = Field(0.95, ge=0, lt=1, description="Decay of the EMA target (with `target: ema`).")
    sample_steps: int = Field(4, gt=0, description="Steps the distilled adapter is made for: previews and "
                              "`lora-sample` use them by default.")  # fmt: skip

    @model_validator(mode="after")
    def _ordered(self) -> DistillSection:
        low, high = self.guidance
        if not 0 <= low <= high:
            raise ValueError(f"distill.guidance must be [low, high] with 0 <= low <= high, got [{low}, {high}]")
        return self


class TransferSection(Section):
    """Adapter distillation (`train.objective: transfer`), which `lora-transfer --method distill` sets up: the
    adapter being trained learns to predict what another base with its adapter predicts. docs/transfer.md has the
    method."""

    source: str | None = Field(
        None,
        description="The base the teacher adapter was trained on (any `model.path` form); loaded with this "
        "preset's `model` settings.",
    )
    adapter: str | None = Field(
        None,
        description="The teacher adapter (any algorithm and layout), on `source`. Its denoiser layers only: "
        "an adapter with text-encoder layers is refused. Relative to the preset file.",
    )
