"""How often a pipeline draws what it is asked for in the shapes world, scored by the offline judge."""

from __future__ import annotations

from typing import Any

from lora_cli.sampling import generate_images
from lora_cli.toy.judge import Judge

SAMPLE_STEPS = 25
GUIDANCE = 4.0


def prompt_for(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def pair_accuracy(
    pipeline: Any, judge: Judge, pairs: list[tuple[str, str]], samples: int, seed: int, size: int = 32
) -> dict[str, float]:
    """Share of `samples` images per (colour, shape) prompt that the judge accepts (colour and shape right)."""
    prompts = [prompt_for(c, s) for c, s in pairs for _ in range(samples)]
    seeds = [seed + i for i in range(len(prompts))]
    images = generate_images(pipeline, prompts, seeds, SAMPLE_STEPS, GUIDANCE, "", size)
    verdicts = judge(images)
    scores = {}
    for index, (colour, shape) in enumerate(pairs):
        chunk = verdicts[index * samples : (index + 1) * samples]
        scores[prompt_for(colour, shape)] = sum(v.matches(colour, shape) for v in chunk) / samples
    return scores
