"""Bring presets written for older lora-cli versions up to the current `version`.

Each entry upgrades a raw preset mapping from version N to N + 1; there are none yet,
so the table documents the contract for the first format change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lora_cli.config.schema import PRESET_VERSION
from lora_cli.errors import PresetError, shown

Migration = Callable[[dict[str, Any]], dict[str, Any]]
MIGRATIONS: dict[int, Migration] = {}


def migrate(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Upgrade `raw` step by step to PRESET_VERSION; refuse versions from the future."""
    version = raw.get("version", PRESET_VERSION)
    if not isinstance(version, int) or version < 1:
        raise PresetError(f"{source}: `version` must be a positive integer, got {shown(version)}")
    if version > PRESET_VERSION:
        raise PresetError(
            f"{source}: preset version {version} is newer than this lora-cli understands "
            f"({PRESET_VERSION}); upgrade lora-cli"
        )
    while version < PRESET_VERSION:
        raw = MIGRATIONS[version](raw)
        version += 1
        raw["version"] = version
    return raw
