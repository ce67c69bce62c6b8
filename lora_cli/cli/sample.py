"""`lora-sample`: preview images from a base with zero, one or many adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lora_cli.cli.errors import run_app
from lora_cli.cli.options import parse_adapter
from lora_cli.errors import LoraCliError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


@app.command(help="Draw images from a base model with zero, one or many adapters, as PNGs and a labelled grid.")
def sample(
    base: Annotated[
        str | None, typer.Option("--base", help="Base model: folder, .safetensors, hub id or builtin:NAME.")
    ] = None,
    config: Annotated[
        str | None,
        typer.Option("--config", help="Diffusers configs for a single-file base: a pipeline folder or hub id."),
    ] = None,
    adapter: Annotated[
        list[str] | None, typer.Option("--adapter", help="Adapter file, optionally FILE:SCALE (repeatable).")
    ] = None,
    prompt: Annotated[list[str] | None, typer.Option("--prompt", help="A prompt (repeatable).")] = None,
    prompts: Annotated[Path | None, typer.Option("--prompts", help="A text file with one prompt per line.")] = None,
    preset: Annotated[
        Path | None, typer.Option("--preset", help="Take the base and the `sample` settings from a preset.")
    ] = None,
    negative: Annotated[str | None, typer.Option("--negative", help="Negative prompt.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the first image of each prompt.")] = None,
    images: Annotated[int, typer.Option("--images", min=1, help="Images per prompt (seeds count up).")] = 1,
    steps: Annotated[
        int | None, typer.Option("--steps", min=1, help="Denoising steps (default: the pipeline's for the base).")
    ] = None,
    guidance: Annotated[
        float | None,
        typer.Option("--guidance", min=0.0, help="Guidance scale (default: the pipeline's; Flux: embedded 3.5)."),
    ] = None,
    text_tokens: Annotated[
        int | None,
        typer.Option(
            "--text-tokens",
            min=1,
            help="T5 token limit (Flux, SD3, PixArt, Wan); default: what the adapters were trained with.",
        ),
    ] = None,
    size: Annotated[
        int | None, typer.Option("--size", min=8, help="Image size in pixels (default: the base's).")
    ] = None,
    scheduler: Annotated[
        str | None,
        typer.Option(
            "--scheduler",
            help="default (the base's), ddim, euler, euler_a, dpmpp_2m, unipc, pndm, ddpm, lcm. Unset: the one a "
            "distilled adapter was made for, else the base's.",
        ),
    ] = None,
    scales: Annotated[str | None, typer.Option("--scales", help="Sweep adapter strength, e.g. 0,0.5,1.0.")] = None,
    compare: Annotated[
        bool, typer.Option("--compare", help="Add a column of base images with the same seeds.")
    ] = False,
    stack: Annotated[
        bool, typer.Option("--stack", help="Apply all adapters together instead of side by side.")
    ] = False,
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("samples"),
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace samples already in --out.")] = False,
    allow_pickle: Annotated[
        bool,
        typer.Option("--allow-pickle", help="Accept .ckpt/.pt/.bin base and adapters (restricted unpickling)."),
    ] = False,
    frames: Annotated[
        int | None,
        typer.Option("--frames", min=1, help="Video bases: frames per video (saved as a strip of frames)."),
    ] = None,
    quantize: Annotated[
        str,
        typer.Option("--quantize", help="Load the denoiser as none, fp8, nf4, fp4 or int8 (as a QLoRA base saw it)."),
    ] = "none",
) -> None:
    from rich.console import Console

    from lora_cli.cli.quiet import quiet_libraries
    from lora_cli.models.quantize import CHOICES
    from lora_cli.sampling.run import SampleRequest

    if quantize not in CHOICES:
        raise LoraCliError(f"--quantize {quantize}: choose one of {', '.join(CHOICES)}")
    defaults = _preset_defaults(preset)
    prompt_list = list(prompt or []) + (_read_prompts(prompts) if prompts else []) or defaults.get("prompts", [])
    base = base or defaults.get("base")
    if not base:
        raise LoraCliError("--base is required (or --preset with a model); e.g. --base builtin:shapes")
    if not prompt_list:
        raise LoraCliError("give at least one --prompt, a --prompts file, or a --preset with sample.prompts")
    request = SampleRequest(
        base=base,
        config=config or defaults.get("config"),
        prompts=prompt_list,
        out=out,
        adapters=[parse_adapter(spec) for spec in adapter or []],
        negative_prompt=negative if negative is not None else defaults.get("negative_prompt", ""),
        seed=seed if seed is not None else defaults.get("seed", 0),
        images_per_prompt=images,
        steps=steps or defaults.get("steps"),
        guidance_scale=guidance if guidance is not None else defaults.get("guidance_scale"),
        text_tokens=text_tokens or defaults.get("text_tokens"),
        size=size or defaults.get("size"),
        scheduler=scheduler,
        scales=parse_scales(scales) if scales else None,
        compare=compare,
        stack=stack,
        device=device,
        overwrite=overwrite,
        allow_pickle=allow_pickle,
        quantize=quantize,
        frames=frames or defaults.get("frames"),
    )
    quiet_libraries()
    from lora_cli.sampling.run import run_sampling

    console = Console(stderr=True)
    written = run_sampling(request, console)
    console.print(f"{len(written) - 1} images and {written[-1]} written", highlight=False)


def parse_scales(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise LoraCliError(f"--scales {text}: expected comma-separated numbers, e.g. 0,0.5,1.0") from None


def _read_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise LoraCliError(f"--prompts {path}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LoraCliError(f"--prompts {path}: not UTF-8 text; save it as UTF-8") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _preset_defaults(preset: Path | None) -> dict:
    if preset is None:
        return {}
    from lora_cli.config import load_preset

    loaded = load_preset(preset)
    sample = loaded.sample
    return {
        "base": loaded.model.path,
        "config": loaded.model.config,
        "prompts": sample.prompts,
        "negative_prompt": sample.negative_prompt,
        "seed": sample.seed,
        "steps": sample.steps,
        "guidance_scale": sample.guidance_scale,
        "size": loaded.data.resolution,
        "text_tokens": loaded.model.max_text_tokens,
        "frames": loaded.data.frames,
    }


def main() -> None:
    run_app(app, "lora-sample")
