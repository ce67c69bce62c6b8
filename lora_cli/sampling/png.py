"""PNG files that carry their generation parameters (A1111-style `parameters` text plus full JSON)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from lora_cli.io.atomic import write_with

JSON_KEY = "lora_cli"


def save_png(image: Image.Image, path: Path, params: dict[str, Any]) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", _a1111_text(params))
    info.add_text(JSON_KEY, json.dumps(params, sort_keys=True))
    write_with(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def read_png_parameters(path: str | Path) -> dict[str, Any]:
    """The JSON parameters lora-cli wrote into a PNG ({} when there are none)."""
    with Image.open(path) as image:
        text = image.text.get(JSON_KEY) if hasattr(image, "text") else None
    return json.loads(text) if text else {}


def _a1111_text(params: dict[str, Any]) -> str:
    """The layout A1111 and many PNG-info tools show: prompt, negative prompt, then key: value pairs."""
    fields = {
        "Steps": params.get("steps"),
        "Sampler": params.get("scheduler"),
        "CFG scale": params.get("guidance_scale"),
        "Seed": params.get("seed"),
        "Size": f"{params.get('width')}x{params.get('height')}",
        "Model": params.get("base"),
        "Adapters": ", ".join(f"{a['name']}:{a['scale']}" for a in params.get("adapters", [])) or "none",
    }
    tail = ", ".join(f"{key}: {value}" for key, value in fields.items())
    return f"{params.get('prompt', '')}\nNegative prompt: {params.get('negative_prompt', '')}\n{tail}"
