"""What an adapter file holds: layout, algorithm, layers with rank and alpha, provenance, damage, and whether it
fits a given base (matched as merge and sample match it, against the base's safetensors headers; nothing is
loaded or instantiated)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from lora_cli.adapters.files import first_nonfinite, load_adapter_tensors
from lora_cli.adapters.functional import layer_rank
from lora_cli.adapters.layouts import parse_layout
from lora_cli.adapters.registry import detect_algorithm
from lora_cli.errors import AdapterError

PROVENANCE_KEYS = ("base_model", "base_fingerprint", "base_architecture", "step", "dataset_fingerprint", "version")


def adapter_info(path: Path) -> dict[str, Any]:
    """The file on its own: a damaged (non-finite) tensor is reported, not refused."""
    from lora_cli.models.registry import ARCHITECTURES

    flat, metadata = load_adapter_tensors(path, check_finite=False)
    parsed = parse_layout(flat, metadata, str(path))
    layout = next((name for a in ARCHITECTURES if (name := a.converts_layout(list(flat)))), parsed.layout)
    layers = {**parsed.stems, **{f"{c}.{m}": named for (c, m), named in parsed.paths.items()}}
    names = {name for named in layers.values() for name in named}
    ranks = {layer: layer_rank(named) for layer, named in layers.items()}
    alphas = {layer: float(named["alpha"]) for layer, named in layers.items() if "alpha" in named}
    info = {
        "file": str(path),
        "layout": layout,
        "algorithm": detect_algorithm(names, str(path)).name,
        "dora": "dora_scale" in names,
        "layers": len(layers),
        "components": dict(Counter(_component(layer, parsed.stems) for layer in layers)),
        "ranks": dict(Counter(ranks.values())),
        "alphas": {str(alpha): count for alpha, count in Counter(alphas.values()).items()},
        "parameters": sum(t.numel() for t in flat.values()),
        "nonfinite_tensor": first_nonfinite(flat),
        "provenance": {key: metadata[f"lora_cli.{key}"] for key in PROVENANCE_KEYS if f"lora_cli.{key}" in metadata},
        "metadata_keys": sorted(metadata),
    }
    if "lora_cli.preset" in metadata:
        try:
            info["preset"] = json.loads(metadata["lora_cli.preset"])
        except json.JSONDecodeError:
            raise AdapterError(f"{path}: metadata lora_cli.preset is not valid JSON") from None
    return info


def fit_to_base(path: Path, base: str, allow_pickle: bool = False) -> dict[str, Any]:
    """Which of the adapter's layers match modules of BASE (anything `--base` takes) and fit their shapes, as
    merge and sample would match them, and whether the base is the one it was trained on (same fingerprint)."""
    from lora_cli.adapters.catalog import ModuleCatalog
    from lora_cli.adapters.files import match_adapter
    from lora_cli.models.weights import open_base_weights

    with open_base_weights(base, "--base", allow_pickle) as weights:
        fingerprint = weights.source.fingerprint()
        found = match_adapter(path, ModuleCatalog.from_weights(weights))
    trained_on = found.metadata.get("lora_cli.base_fingerprint")
    return {
        "base": base,
        "matched_layers": len(found.tensors),
        "unmatched_layers": found.unmatched,
        "wrong_shape_layers": found.wrong_shape,
        "fits": bool(found.tensors) and not found.unmatched and not found.wrong_shape,
        "same_base_as_training": None if trained_on is None else trained_on == fingerprint,
    }


def _component(layer: str, stems: dict) -> str:
    """A layer's component: named in the key, or for a kohya stem the one whose prefix (of any architecture)
    it starts with, the longest prefix winning."""
    from lora_cli.models.registry import ARCHITECTURES

    if layer not in stems:
        return layer.split(".", 1)[0]
    owners = [(len(s.prefix), c) for a in ARCHITECTURES for c, s in a.kohya_table.items() if layer.startswith(s.prefix)]
    return max(owners)[1] if owners else "other"


def carry_over_summary(
    path: Path, source: str, base: str, threshold: float, energy: float, method: str
) -> dict[str, Any]:
    """How well the adapter trained on SOURCE carries over to BASE (`lora-transfer`'s per-layer similarity)."""
    from lora_cli.toolbox.transfer import carry_over

    report = carry_over(path, source, base, threshold, energy, method)
    similarities = [layer.similarity for layer in report.layers]
    return {
        "from": source,
        "threshold": threshold,
        "subspace_energy": energy,
        "method": method,
        "similar_layers": len(report.layers) - len(report.skipped),
        "dissimilar_layers": [layer.module for layer in report.skipped],
        "missing_layers": report.missing + report.reshaped,
        "mean_similarity": round(sum(similarities) / len(similarities), 4) if similarities else None,
        "layers": {layer.module: {"similarity": round(layer.similarity, 4), "change": round(layer.change, 4)}
                   for layer in report.layers},
    }  # fmt: skip
