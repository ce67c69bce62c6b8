"""Preset schema and loading."""

from lora_cli.config.loader import load_preset, preset_to_yaml, validate_preset
from lora_cli.config.schema import Preset

__all__ = ["Preset", "load_preset", "preset_to_yaml", "validate_preset"]
