"""What an adapter file holds: layout, algorithm, layers with rank and alpha, provenance, and whether it fits
a given base (checked against the base's safetensors headers; nothing is loaded or instantiated)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from lora_cli.adapters.registry import detect_algorithm
from lora_cli.errors import AdapterError
from lora_cli.io.safetensors_file import load_tensors

PROVENANCE_KEYS = ("base_model", "base_fingerprint", "base_architecture", "step", "dataset_fingerprint", "version")


def adapter_info(path: Path) -> dict[str, Any]:
    flat, metadata = load_tensors(path, AdapterError)
    if not flat:
        raise AdapterError(f"{path}: the file holds no tensors")
    kohya = any(key.startswith("lora_") for key in flat)
    layers = _group_layers(flat, kohya)
    names = {name for named in layers.values() for name in named}
    algorithm = detect_algorithm(names, str(path)).name if kohya else "lora"
    ranks = {layer: _rank(named) for layer, named in layers.items()}
    alphas = {layer: float(named["alpha"]) for layer, named in layers.items() if "alpha" in named}
    info = {
        "file": str(path),
        "layout": "kohya" if kohya else "diffusers",
        "algorithm": algorithm,
        "dora": "dora_scale" in names or "lora_magnitude_vector" in names,
        "layers": len(layers),
        "components": dict(Counter(_component(layer, kohya) for layer in layers)),
        "ranks": dict(Counter(ranks.values())),
        "alphas": {str(alpha): count for alpha, count in Counter(alphas.values()).items()},
        "parameters": sum(t.numel() for t in flat.values()),
        "provenance": {key: metadata[f"lora_cli.{key}"] for key in PROVENANCE_KEYS if f"lora_cli.{key}" in metadata},
        "metadata_keys": sorted(metadata),
    }
    if "lora_cli.preset" in metadata:
        info["preset"] = json.loads(metadata["lora_cli.preset"])
    return info


def fit_to_base(path: Path, base: Path) -> dict[str, Any]:
    """Which of the adapter's layers exist in BASE (a diffusers folder or single file), and whether the base is
    the one it was trained on (same weight-header fingerprint)."""
    import torch

    from lora_cli.adapters.functional import delta_weight
    from lora_cli.config.schema import ModelSection
    from lora_cli.io.adapter_file import read_adapter
    from lora_cli.models.source import weight_fingerprint
    from lora_cli.models.weights import open_base_weights

    weights = open_base_weights(base)
    shapes = weights.shapes
    unmatched: list[str] = []
    fingerprint = weight_fingerprint(ModelSection(path=str(base)), base)
    report: dict[str, Any] = {"base": str(base)}
    try:
        _, tensors, metadata = read_adapter(path, weights.kohya_index(), unmatched)
    except AdapterError as exc:  # nothing matches, or a layer is incomplete: it does not fit
        return {**report, "matched_layers": 0, "fits": False, "problem": str(exc)}
    wrong_shape = []
    for key, named in tensors.items():
        try:
            delta_weight(named, torch.Size(shapes[key]))
        except RuntimeError:
            wrong_shape.append(key[1])
    trained_on = metadata.get("lora_cli.base_fingerprint")
    return {
        **report,
        "matched_layers": len(tensors),
        "unmatched_layers": unmatched,
        "wrong_shape_layers": wrong_shape,
        "fits": not unmatched and not wrong_shape,
        "same_base_as_training": None if trained_on is None else trained_on == fingerprint,
    }


def _group_layers(flat: dict, kohya: bool) -> dict[str, dict]:
    layers: dict[str, dict] = {}
    for key, value in flat.items():
        if kohya:
            layer, _, name = key.partition(".")
        else:
            layer, name = _split_diffusers(key)
        layers.setdefault(layer, {})[name] = value
    return layers


def _split_diffusers(key: str) -> tuple[str, str]:
    for suffix in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"):
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    raise AdapterError(f"unrecognised diffusers adapter key {key}")


def _rank(named: dict) -> int:
    for name, axis in (
        ("lora_down.weight", 0),
        ("lora_A.weight", 0),
        ("hada_w1_a", 1),
        ("lokr_w2_a", 1),
        ("lokr_w1_a", 1),
    ):
        if name in named:
            return int(named[name].shape[axis])
    return int(round(float(named.get("alpha", 0))))  # LoKr with two full factors stores alpha = rank


def _component(layer: str, kohya: bool) -> str:
    if not kohya:
        return layer.split(".", 1)[0]
    return "text_encoder" if layer.startswith("lora_te") else "unet" if layer.startswith("lora_unet") else "other"
