"""Where a base model lives, for every command alike: a diffusers folder, a single-file `.safetensors`
checkpoint, `builtin:NAME`, or a hub id (its local snapshot); pickle files only when the user opts in.

`open_base_source` is the one way a command turns what the user wrote into a local location, its pipeline class
and its architecture, with one set of rules and one error vocabulary (`where` names the argument or key).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lora_cli.builtin import BUILTIN_PREFIX, builtin_models, builtin_path
from lora_cli.errors import ModelLoadError
from lora_cli.io.pickle_file import as_safetensors, is_pickle
from lora_cli.io.safetensors_file import PICKLE_SUFFIXES, read_header, weights_fingerprint
from lora_cli.models.base import Architecture, BaseIdentity


@dataclass(frozen=True)
class BaseSource:
    """A base resolved to local files: `location` is a pipeline folder or a single `.safetensors` file."""

    text: str  # what the user wrote (recorded in adapter metadata, shown in messages)
    location: Path
    pipeline_class: str
    architecture: Architecture
    variant: str | None = None

    @property
    def is_single_file(self) -> bool:
        return self.location.is_file()

    def fingerprint(self) -> str:
        """sha256 over the weight files' headers and a sample of every tensor's bytes (see `weights_fingerprint`)."""
        files = [self.location] if self.is_single_file else sorted(self.location.rglob("*.safetensors"))
        return weights_fingerprint(files)

    def identity(self) -> BaseIdentity:
        """What adapter metadata records about the base: where it came from, its fingerprint, its architecture."""
        return BaseIdentity(self.text, self.fingerprint(), self.architecture.name)


@contextmanager
def open_base_source(
    text: str | Path,
    where: str,
    revision: str | None = None,
    variant: str | None = None,
    allow_pickle: bool = False,
) -> Iterator[BaseSource]:
    """Resolve `text` to a `BaseSource`. A pickle checkpoint is refused unless `allow_pickle`, then read with
    restricted unpickling into a temporary safetensors copy that lives as long as the context."""
    text = str(text)
    location = local_location(text, where, revision, variant)
    if location.is_file() and is_pickle(location):
        if not allow_pickle:
            raise ModelLoadError(
                f"{where}: {location} is a pickle-based checkpoint, which can run code when loaded; "
                "convert it to .safetensors or pass --allow-pickle"
            )
        with as_safetensors([location], True, Path(tempfile.gettempdir())) as (converted,):
            yield _describe(text, converted, where, variant)
        return
    yield _describe(text, location, where, variant)


def local_location(text: str, where: str, revision: str | None = None, variant: str | None = None) -> Path:
    """The local file or folder `text` names: `builtin:NAME`, an existing path, or a hub id's local snapshot."""
    if text.startswith(BUILTIN_PREFIX):
        name = text.removeprefix(BUILTIN_PREFIX)
        if name not in builtin_models():
            raise ModelLoadError(f"{where}: no built-in model `{name}`; available: {', '.join(builtin_models())}")
        return builtin_path(name)
    path = Path(text).expanduser()
    if path.exists():
        return path
    looks_local = text.startswith((".", "/", "~")) or path.suffix.lower() in (".safetensors", *PICKLE_SUFFIXES)
    if looks_local or text.count("/") != 1:
        raise ModelLoadError(
            f"{where}: {text} does not exist; give a diffusers folder, a .safetensors file, builtin:NAME or a hub id"
        )
    return _hub_snapshot(text, where, revision, variant)


def _hub_snapshot(repo: str, where: str, revision: str | None, variant: str | None) -> Path:
    """The hub pipeline's local snapshot: from the Hugging Face cache, downloaded first when the hub is reachable
    (diffusers' own download rules: the components model_index.json names, safetensors preferred)."""
    from diffusers import DiffusionPipeline

    try:
        return Path(DiffusionPipeline.download(repo, revision=revision, variant=variant))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"{where}: cannot find hub model {repo} locally or on the hub ({_first_line(exc)[:200]}); "
            f"download it with `hf download {repo}` or give a local folder"
        ) from None


def _describe(text: str, location: Path, where: str, variant: str | None) -> BaseSource:
    from lora_cli.models.registry import architecture_for

    pipeline_class = pipeline_class_of(location, where)
    return BaseSource(text, location, pipeline_class, architecture_for(pipeline_class, f"{where}: {text}"), variant)


def pipeline_class_of(location: Path, where: str) -> str:
    """The `_class_name` from model_index.json, or the family a single-file checkpoint's keys belong to."""
    if location.is_file():
        if location.suffix.lower() != ".safetensors":
            raise ModelLoadError(
                f"{where}: {location} is not a .safetensors checkpoint; pickle formats are refused (they can run code)"
            )
        from lora_cli.models.single_file import detect_layout

        return detect_layout(read_header(location, ModelLoadError), f"{where}: {location}").pipeline_class
    index = location / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(
            f"{where}: {location} has no model_index.json; give a diffusers pipeline folder or a .safetensors file"
        )
    try:
        return json.loads(index.read_text())["_class_name"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise ModelLoadError(f"{where}: {index} is damaged (not JSON with a _class_name)") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
