"""How often a pipeline draws what it is asked for in the shapes world, scored by the offline judge."""

from __future__ import annotations

from typing import Any

from lora_cli.sampling import generate_images
from lora_cli.toy.judge import Judge

SAMPLE_STEPS = 25
GUIDANCE = 4.0
# Each built-in base is scored at the guidance it draws its known prompts best with (docs/builtin-base.md): the
# UNet at 4; the DiT's known-prompt accuracy falls from 1.00 at 2 to 0.90 at 4 (over-saturated colours).
EVALUATION_GUIDANCE = {"builtin:shapes": GUIDANCE, "builtin:shapes-dit": 2.0}


def guidance_for(base_path: str) -> float:
    return EVALUATION_GUIDANCE.get(base_path, GUIDANCE)


def prompt_for(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def pair_accuracy(
    pipeline: Any,
    judge: Judge,
    pairs: list[tuple[str, str]],
    samples: int,
    seed: int,
    size: int = 32,
    text_tokens: int | None = None,
    guidance: float = GUIDANCE,
) -> dict[str, float]:
    """Share of `samples` images per (colour, shape) prompt that the judge accepts (colour and shape right);
    `text_tokens` is the T5 length of a DiT base (builtin:shapes-dit reads 16)."""
    prompts = [prompt_for(c, s) for c, s in pairs for _ in range(samples)]
    seeds = [seed + i for i in range(len(prompts))]
    images = generate_images(pipeline, prompts, seeds, SAMPLE_STEPS, guidance, "", size, text_tokens=text_tokens)
    verdicts = judge(images)
    scores = {}
    for index, (colour, shape) in enumerate(pairs):
        chunk = verdicts[index * samples : (index + 1) * samples]
        scores[prompt_for(colour, shape)] = sum(v.matches(colour, shape) for v in chunk) / samples
    return scores
