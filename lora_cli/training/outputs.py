"""The run folder's layout, the rule that an earlier run is never silently overwritten, and file metadata."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from lora_cli import __version__
from lora_cli.adapters.injection import InjectedAdapter
from lora_cli.adapters.registry import get_algorithm
from lora_cli.config.schema import Preset
from lora_cli.errors import OutputExistsError
from lora_cli.io.atomic import remove_directory
from lora_cli.models.base import Architecture, BaseIdentity
from lora_cli.sampling.schedulers import SAMPLER_KEY, Sampler


@dataclass(frozen=True)
class RunPaths:
    root: Path
    name: str

    @property
    def adapter(self) -> Path:
        return self.root / f"{self.name}.safetensors"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def loss_plot(self) -> Path:
        return self.root / "loss.png"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def preset(self) -> Path:
        return self.root / "preset.yaml"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    def results(self) -> list[Path]:
        """What a finished or interrupted run leaves behind (the cache is content-keyed and always reusable)."""
        candidates = [
            self.adapter,
            self.checkpoints,
            self.metrics,
            self.loss_plot,
            self.samples,
            self.tensorboard,
        ]
        return [path for path in candidates if path.exists()]


def claim_run_folder(paths: RunPaths, resume: bool, overwrite: bool, clear: bool = True) -> None:
    """Refuse to mix with an earlier run unless the user asked to resume it or to replace it; with
    `--overwrite`, `clear` removes its results (one process does, when several start together)."""
    existing = paths.results()
    if not existing or resume:
        return
    if not overwrite:
        raise OutputExistsError(
            f"{paths.root} already holds a run ({existing[0].name}); use --resume to continue it, "
            "--overwrite to replace it, or set output.dir to a new folder"
        )
    if not clear:
        return
    for path in existing:
        remove_directory(path) if path.is_dir() else path.unlink()


def remove_stale_temporaries(paths: RunPaths) -> int:
    """Delete the temporary files and folders (`.NAME.*.tmp`) that a killed run left behind; returns how many."""
    if not paths.root.is_dir():
        return 0
    stale = sorted(p for p in paths.root.rglob(".*.tmp") if p.name.startswith("."))
    for path in stale:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return len(stale)


def adapter_format(preset: Preset, architecture: Architecture) -> str:
    """`output.format`, or the architecture's usual layout where the algorithm fits in it (LoHa and LoKr only
    fit kohya/LyCORIS keys)."""
    if preset.output.format is not None:
        return preset.output.format
    formats = get_algorithm(preset.adapter.type).formats
    return architecture.default_format if architecture.default_format in formats else formats[0]


def adapter_metadata(
    preset: Preset,
    identity: BaseIdentity,
    adapter: InjectedAdapter,
    step: int,
    dataset_fingerprint: str,
    sampler: Sampler | None = None,
) -> dict[str, str]:
    """Self-describing header: algorithm, rank, alpha, targets, base identity, preset, step, dataset, and for a
    distilled adapter the sampler it is made for."""
    spec = adapter.spec
    made_for = {SAMPLER_KEY: sampler.to_metadata()} if sampler is not None else {}
    return {
        **made_for,
        "lora_cli.version": __version__,
        "lora_cli.algorithm": spec.algorithm,
        "lora_cli.dora": str(spec.dora).lower(),
        "lora_cli.rank": str(spec.rank),
        "lora_cli.alpha": str(spec.alpha),
        "lora_cli.targets": json.dumps(adapter.targets),
        "lora_cli.base_model": identity.source,
        "lora_cli.base_fingerprint": identity.fingerprint,
        "lora_cli.base_architecture": identity.architecture,
        "lora_cli.preset": json.dumps(preset.model_dump(mode="json")),
        "lora_cli.step": str(step),
        "lora_cli.dataset_fingerprint": dataset_fingerprint,
        # kohya's keys, shown by A1111/ComfyUI tools that inspect LoRA files.
        "ss_network_module": adapter.algorithm.kohya_network_module,
        "ss_network_dim": str(spec.rank),
        "ss_network_alpha": str(spec.alpha),
        "ss_sd_model_name": identity.source,
        "ss_steps": str(step),
    }
