"""`lora-sample` end to end: load the base once, then draw every column (base, adapters, scales) of the grid."""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from lora_cli.adapters.catalog import ModuleCatalog
from lora_cli.adapters.files import AdapterFile, adapter_metadata, read_adapter
from lora_cli.config.schema import ModelSection
from lora_cli.errors import LoraCliError, OutputExistsError
from lora_cli.io.atomic import write_with
from lora_cli.io.pickle_file import as_safetensors
from lora_cli.sampling import generate_images, image_grid, pipeline_default
from lora_cli.sampling.png import save_png
from lora_cli.sampling.schedulers import FEW_STEP_DEFAULTS, Sampler, make_scheduler
from lora_cli.sampling.switcher import make_switcher


@dataclass
class SampleRequest:
    base: str
    prompts: list[str]
    out: Path
    config: str | None = None  # diffusers configs for a single-file base (a folder or hub id)
    adapters: list[tuple[Path, float]] = field(default_factory=list)
    negative_prompt: str = ""
    seed: int = 0
    images_per_prompt: int = 1
    steps: int | None = None  # None: the pipeline's default for the architecture
    guidance_scale: float | None = None  # None: likewise (Flux: embedded guidance 3.5)
    text_tokens: int | None = None  # T5 length; None: what the adapters were trained with, else the base's
    size: int | None = None
    scheduler: str | None = None  # None: what a distilled adapter records, else the base's own ("default")
    scales: list[float] | None = None
    compare: bool = False
    stack: bool = False
    device: str = "auto"
    overwrite: bool = False
    allow_pickle: bool = False  # accept .ckpt/.pt/.bin base and adapters (restricted unpickling)
    quantize: str = "none"  # load the denoiser quantized, as an adapter trained on such a base saw it
    frames: int | None = None  # video bases: frames per video (each saved as a strip of frames)


@dataclass(frozen=True)
class Column:
    label: str
    active: list[tuple[AdapterFile, float]]


def plan_columns(request: SampleRequest, files: list[AdapterFile]) -> list[Column]:
    """Grid columns: the base (without adapters or with --compare), then adapters side by side, each at
    its scale or at every --scales value; with --stack all adapters are active together."""
    columns = [Column("base", [])] if request.compare or not files else []
    named = [(file, scale) for file, (_, scale) in zip(files, request.adapters, strict=True)]
    if request.stack and named:
        multipliers = request.scales or [1.0]
        for m in multipliers:
            label = " + ".join(f"{f.path.stem}@{s * m:g}" for f, s in named)
            columns.append(Column(label, [(f, s * m) for f, s in named]))
        return columns
    for file, scale in named:
        for value in request.scales or [scale]:
            columns.append(Column(f"{file.path.stem}@{value:g}", [(file, value)]))
    return columns


def run_sampling(request: SampleRequest, console: Console) -> list[Path]:
    """Draw the grid; returns the written PNGs (each image, then the grid)."""
    grid_path = request.out / "grid.png"
    if grid_path.exists() and not request.overwrite:
        raise OutputExistsError(f"{request.out} already holds samples; pass --overwrite or choose another --out")
    adapters = [path for path, _ in request.adapters]
    with as_safetensors(adapters, request.allow_pickle, Path(tempfile.gettempdir())) as readable:
        return _draw_grid(request, readable, grid_path, console)


def _draw_grid(request: SampleRequest, adapter_paths: list[Path], grid_path: Path, console: Console) -> list[Path]:
    from lora_cli.models import load_base

    device = _device(request.device)
    dtype = "float32"
    if device.type == "cuda":  # bf16 where the GPU has it: DiTs overflow in fp16
        import torch

        dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    spec = ModelSection(
        path=request.base, config=request.config, dtype=dtype, allow_pickle=request.allow_pickle,
        quantize=request.quantize, max_text_tokens=request.text_tokens or trained_text_tokens(adapter_paths, console),
    )  # fmt: skip
    base = load_base(spec, device)
    for module in (base.denoiser, base.vae, *base.text_encoders.values()):
        module.to(device)
    sampler = resolve_sampler(request, adapter_paths, console)
    if base.architecture.flow_matching and sampler.scheduler != "default":
        raise LoraCliError(
            f"--scheduler {sampler.scheduler}: {base.architecture.name} is a flow-matching base and samples with its "
            "own flow scheduler; leave --scheduler unset (or `default`)"
        )
    base.pipeline_extras["scheduler"] = make_scheduler(
        sampler.scheduler, base.pipeline_extras["scheduler"], sampler.solver_steps
    )
    pipeline = base.architecture.build_pipeline(base)
    components = base.trainable_components()
    catalog = ModuleCatalog.from_components(base.architecture, components)
    files = [read_adapter(path, catalog) for path in adapter_paths]
    for line in quantization_warnings(base, files, request.quantize):
        console.print(f"[yellow]warning[/]: {line}", highlight=False)
    switcher = make_switcher(components, files)
    settings = DrawSettings(
        scheduler=sampler.scheduler,
        steps=request.steps or sampler.steps or pipeline_default(pipeline, "num_inference_steps"),
        guidance_scale=next(
            value
            for value in (
                request.guidance_scale,
                sampler.guidance_scale,
                pipeline_default(pipeline, base.architecture.cfg_parameter),
            )
            if value is not None
        ),
        size=request.size or base.architecture.native_size(base),
        text_tokens=base.pipeline_extras.get("text_tokens"),
    )
    rows = [(prompt, request.seed + i) for prompt in request.prompts for i in range(request.images_per_prompt)]
    columns = plan_columns(request, files)

    written: list[Path] = []
    grid_cells: list[list[Any]] = [[] for _ in rows]
    from rich.progress import Progress

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("sampling", total=len(rows) * len(columns))
        for number, column in enumerate(columns):
            switcher.apply(column.active)
            images = generate_images(
                pipeline,
                [prompt for prompt, _ in rows],
                [seed for _, seed in rows],
                settings.steps,
                settings.guidance_scale,
                request.negative_prompt,
                settings.size,
                on_batch=lambda count: progress.advance(task, count),
                guidance_parameter=base.architecture.cfg_parameter,
                frames=request.frames,
                text_tokens=settings.text_tokens,
            )
            for row, ((prompt, seed), image) in enumerate(zip(rows, images, strict=True)):
                params = _params(request, settings, column, prompt, seed)
                path = request.out / f"{row:03d}-{number:02d}-{_slug(column.label)}-seed{seed}.png"
                save_png(image, path, params)
                written.append(path)
                grid_cells[row].append(image)
    switcher.restore()
    labels = [f"{prompt} (seed {seed})" for prompt, seed in rows]
    grid = image_grid(grid_cells, labels, [column.label for column in columns])
    write_with(grid_path, lambda tmp: grid.save(tmp, format="PNG"))
    return [*written, grid_path]


@dataclass(frozen=True)
class DrawSettings:
    """What every image of a grid is drawn with, defaults resolved (and recorded in each PNG)."""

    scheduler: str
    steps: int
    guidance_scale: float
    size: int
    text_tokens: int | None


def resolve_sampler(request: SampleRequest, adapter_paths: list[Path], console: Console) -> Sampler:
    """--scheduler, or the sampler the first distilled adapter records (said in one line), or the base's own;
    a few-step scheduler brings its steps and guidance unless --steps/--guidance are given."""
    recorded = [(path, Sampler.from_metadata(adapter_metadata(path))) for path in adapter_paths]
    recorded = [(path, sampler) for path, sampler in recorded if sampler is not None]
    name = request.scheduler
    if recorded and name in (None, recorded[0][1].scheduler):
        path, sampler = recorded[0]
        if name is None:
            console.print(
                f"{path.name} is distilled for {sampler.steps} steps ({sampler.scheduler} scheduler, guidance "
                f"{sampler.guidance_scale:g}); drawing with those (--scheduler, --steps, --guidance change them)",
                highlight=False,
            )
        return sampler
    name = name or "default"
    return Sampler(name, *FEW_STEP_DEFAULTS.get(name, (None, None)))


def trained_text_tokens(adapter_paths: list[Path], console: Console) -> int | None:
    """The T5 token limit the adapters were trained with (lora-cli records its preset); the first one recorded
    wins, and adapters that disagree are reported."""
    recorded = []
    for path in adapter_paths:
        preset = adapter_metadata(path).get("lora_cli.preset")
        try:
            tokens = json.loads(preset).get("model", {}).get("max_text_tokens") if preset else None
        except (json.JSONDecodeError, AttributeError):
            tokens = None
        if isinstance(tokens, int) and tokens > 0:
            recorded.append((path, tokens))
    if len({tokens for _, tokens in recorded}) > 1:
        listed = ", ".join(f"{path.name}: {tokens}" for path, tokens in recorded)
        console.print(
            f"[yellow]warning[/]: the adapters were trained with different T5 token limits ({listed}); drawing "
            f"with {recorded[0][1]} (set --text-tokens to choose)",
            highlight=False,
        )
    return recorded[0][1] if recorded else None


def _device(name: str):
    import torch

    if name not in ("auto", "cpu", "cuda"):
        raise LoraCliError(f"--device {name}: choose auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise LoraCliError("--device cuda: no CUDA device is available here; use --device cpu")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def _params(request: SampleRequest, settings: DrawSettings, column: Column, prompt: str, seed: int) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "negative_prompt": request.negative_prompt,
        "seed": seed,
        "steps": settings.steps,
        "guidance_scale": settings.guidance_scale,
        "scheduler": settings.scheduler,
        "width": settings.size,
        "height": settings.size,
        "text_tokens": settings.text_tokens,
        "base": request.base,
        "adapters": [{"name": f.path.name, "path": str(f.path), "scale": s} for f, s in column.active],
    }


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.@+-]+", "_", text)[:60]


def quantization_warnings(base: Any, files: list[AdapterFile], quantize: str) -> list[str]:
    """For adapters trained on a quantized base and drawn on a different one: how many of their layers change
    less than that quantization's error."""
    from lora_cli.adapters.functional import delta_weight
    from lora_cli.models.quantize import hidden_by_quantization, hidden_warning, trained_quantized

    components = base.trainable_components()
    lines = []
    for file in files:
        mode = trained_quantized(file.metadata)
        if mode is None or mode == quantize:
            continue
        hidden = 0
        for (component, module), named in file.tensors.items():
            layer = components[component].get_submodule(module)
            weight = getattr(layer, "base_layer", layer).weight.detach()
            hidden += hidden_by_quantization(weight, delta_weight(named, weight.shape), mode)
        if hidden:
            lines.append(hidden_warning(file.path.name, hidden, len(file.tensors), mode))
    return lines
