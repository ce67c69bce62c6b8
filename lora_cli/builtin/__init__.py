"""Model files that ship inside the package: the `builtin:shapes` base and the shapes judge."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

BUILTIN_PREFIX = "builtin:"


def builtin_path(name: str) -> Path:
    """The installed location of a shipped file or folder."""
    return Path(str(resources.files("lora_cli.builtin") / name))


def builtin_models() -> list[str]:
    """Names usable as `model.path: builtin:NAME`."""
    root = builtin_path("")
    return sorted(p.name for p in root.iterdir() if (p / "model_index.json").is_file())
