"""Memory sizes as users write them (`12GiB`, `16GB`, `800MiB`) and as the planner prints them."""

from __future__ import annotations

import re

from lora_cli.errors import PresetError

UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str, option: str = "size") -> int:
    """Bytes from `12GiB`, `12 GB`, `800MiB`, `1.5GiB` or a plain byte count; a bad value is a `PresetError`."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in UNITS:
        raise PresetError(f"{option}: cannot read {text!r} as a size; write e.g. 12GiB, 16GB, 800MiB or bytes")
    size = int(float(match.group(1)) * UNITS[unit])
    if size <= 0:
        raise PresetError(f"{option}: {text!r} is not a positive size")
    return size


def format_size(size: float) -> str:
    """`11.8 GiB`, `640 MiB`: binary units, three significant figures at most."""
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(size) >= factor:
            value = size / factor
            return f"{value:.1f} {unit}" if abs(value) < 100 else f"{value:.0f} {unit}"
    return f"{size:.0f} B"
