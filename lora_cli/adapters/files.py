"""The one owner of adapter files: reading any layout users download, matching it to a base, and writing the
kohya or diffusers layout.

Reading is three steps: load the tensors (a `.safetensors` file or a peft `save_pretrained` folder; every
tensor must be finite), recognise the layout (`lora_cli.adapters.layouts`), and match its layers to a base's
modules (`ModuleCatalog`), through the architecture's kohya names and their aliases, or — for layouts that
rename or fuse modules in an architecture's own way — through diffusers' converters for that pipeline.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lora_cli.adapters.catalog import ModuleCatalog
from lora_cli.adapters.keys import AdapterTensors, ModuleKey, to_diffusers, to_kohya
from lora_cli.adapters.layouts import DENOISER, DIFFUSERS_METADATA_KEY, UNKNOWN, ParsedAdapter, parse_layout
from lora_cli.adapters.registry import AdapterAlgorithm, detect_algorithm, exact_pattern
from lora_cli.errors import AdapterError, printable
from lora_cli.io.safetensors_file import load_tensors

if TYPE_CHECKING:
    from lora_cli.models.base import Architecture
    from lora_cli.models.naming import KohyaTable

FileFormat = str  # one of FILE_FORMATS
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


@dataclass
class AdapterFile:
    """An adapter file read against a base: its layers in the internal namespace."""

    path: Path
    layout: str
    architecture: Architecture
    algorithm: AdapterAlgorithm
    tensors: AdapterTensors
    metadata: dict[str, str]
    unmatched: list[str] = field(default_factory=list)  # layers that match nothing (only with allow_partial)


def load_adapter_tensors(path: str | Path, check_finite: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of an adapter file or peft folder; a NaN or infinity is refused with the name
    of the first tensor that holds one (a damaged adapter would otherwise draw black images)."""
    path = Path(path)
    metadata: dict[str, str] = {}
    if path.is_dir():
        if not (path / PEFT_WEIGHTS).is_file():
            raise AdapterError(f"{path}: a folder, but not a peft adapter folder ({PEFT_WEIGHTS} is missing)")
        metadata = {"peft_config": _peft_folder_config(path)}
        path = path / PEFT_WEIGHTS
    flat, file_metadata = load_tensors(path, AdapterError)
    if not flat:
        raise AdapterError(f"{path}: the file holds no tensors")
    if check_finite:
        bad = first_nonfinite(flat)
        if bad is not None:
            raise AdapterError(f"{path}: tensor {printable(bad)} holds NaN or infinite values; the adapter is damaged")
    return flat, {**file_metadata, **metadata}


def adapter_metadata(path: str | Path) -> dict[str, str]:
    """An adapter's metadata alone (a safetensors header; a peft folder's config), no tensor read."""
    from lora_cli.io.safetensors_file import read_metadata

    path = Path(path)
    if path.is_dir():
        return {"peft_config": _peft_folder_config(path)}
    return read_metadata(path, AdapterError)


def first_nonfinite(flat: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor (in file order) with a NaN or infinity, or None."""
    for name, value in flat.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            return name
    return None


@dataclass
class AdapterMatch:
    """How an adapter file's layers meet a base: the matched layers and what did not match or fit."""

    layout: str
    tensors: AdapterTensors
    metadata: dict[str, str]
    unmatched: list[str]  # layers naming no module of the base
    wrong_shape: list[str]  # modules whose shape the layer does not fit (or whose layer is incomplete)
    layers: int  # layers in the file


def match_adapter(path: str | Path, catalog: ModuleCatalog) -> AdapterMatch:
    """Match an adapter in any supported layout to `catalog`'s modules without judging the result."""
    flat, metadata = load_adapter_tensors(path)
    parsed = parse_layout(flat, metadata, str(path))
    tensors, unmatched = _match(parsed, catalog)
    foreign = catalog.architecture.converts_layout(list(flat))
    if unmatched and foreign:
        parsed = parse_layout(_via_diffusers(flat, catalog.architecture, path), {}, str(path))
        parsed.layout = foreign
        tensors, unmatched = _match(parsed, catalog)
    wrong_shape = [key[1] for key, named in tensors.items() if not _fits(named, catalog.shapes[key])]
    return AdapterMatch(parsed.layout, tensors, metadata, unmatched, wrong_shape, parsed.layer_count())


def read_adapter(path: str | Path, catalog: ModuleCatalog, allow_partial: bool = False) -> AdapterFile:
    """Read an adapter in any supported layout and match its layers to `catalog`'s modules. Layers that match
    nothing are an error unless `allow_partial` (they are then listed in `unmatched`); a layer that does not
    fit its module's shape always is."""
    found = match_adapter(path, catalog)
    if not found.tensors:
        raise AdapterError(
            f"{path}: none of its {found.layers} layers matches this {catalog.architecture.name} base "
            f"({found.layout} layout, e.g. {printable(found.unmatched[0])}); is it an adapter for another model?"
        )
    if found.unmatched and not allow_partial:
        shown = ", ".join(printable(layer) for layer in found.unmatched[:3]) + (
            f" (+{len(found.unmatched) - 3} more)" if len(found.unmatched) > 3 else ""
        )
        raise AdapterError(f"{path}: {len(found.unmatched)} adapter layer(s) match nothing in the base, e.g. {shown}")
    algorithm = detect_algorithm({name for named in found.tensors.values() for name in named}, str(path))
    for key, named in found.tensors.items():
        if not algorithm.complete(set(named)):
            raise AdapterError(f"{path}: layer {key[1]} is incomplete (has only {', '.join(sorted(named))})")
    if found.wrong_shape:
        key = next(key for key in found.tensors if key[1] == found.wrong_shape[0])
        shapes = {n: tuple(t.shape) for n, t in found.tensors[key].items() if n != "alpha"}
        raise AdapterError(
            f"{path}: layer {key[1]} does not fit this base (weight {catalog.shapes[key]}, adapter {shapes})"
        )
    return AdapterFile(
        Path(path), found.layout, catalog.architecture, algorithm, found.tensors, found.metadata, found.unmatched
    )


def read_adapter_standalone(path: str | Path, literal_stems: bool = False) -> AdapterFile:
    """An adapter read without a base. Module names come from the keys (diffusers, peft, ComfyUI layouts and
    the layouts diffusers converts), or for kohya stems from lora-cli's `lora_cli.targets` metadata; other
    kohya files need a base, unless `literal_stems` keeps their stems as module names (rewriting them as they
    were). The architecture comes from the metadata, the layout, or the components the keys name."""
    flat, metadata = load_adapter_tensors(path)
    parsed = parse_layout(flat, metadata, str(path))
    architecture = _architecture_of(parsed, list(flat), metadata, path)
    foreign = architecture.converts_layout(list(flat))
    if foreign:
        parsed = parse_layout(_via_diffusers(flat, architecture, path), {}, str(path))
        parsed.layout = foreign
    if parsed.stems and "lora_cli.targets" in metadata:
        targets = json.loads(metadata["lora_cli.targets"])
        catalog = ModuleCatalog(architecture, {(c, m): None for c, modules in targets.items() for m in modules})
        tensors, unmatched = _match(parsed, catalog)
        if unmatched:
            raise AdapterError(f"{path}: layer {printable(unmatched[0])} is not among the modules its metadata lists")
    elif parsed.stems and literal_stems:
        tensors = {(_component_of_stem(stem, architecture), stem): dict(named) for stem, named in parsed.stems.items()}
    elif parsed.stems:
        raise AdapterError(f"{path}: kohya keys do not spell module names unambiguously; pass --base BASE")
    else:
        denoiser = architecture.denoiser_name
        tensors = {
            (denoiser if component in (DENOISER, UNKNOWN) else component, module): dict(named)
            for (component, module), named in parsed.paths.items()
        }
    algorithm = detect_algorithm({name for named in tensors.values() for name in named}, str(path))
    return AdapterFile(Path(path), parsed.layout, architecture, algorithm, tensors, metadata)


def _architecture_of(parsed: ParsedAdapter, keys: list[str], metadata: dict[str, str], path) -> Architecture:
    """The architecture an adapter file is for, as far as a file without a base tells it."""
    from lora_cli.models.registry import ARCHITECTURES, architecture_named

    recorded = metadata.get("lora_cli.base_architecture")
    if recorded:
        try:
            return architecture_named(recorded)
        except KeyError:
            raise AdapterError(f"{path}: made for a `{recorded}` base, which this lora-cli does not know") from None
    converting = [a for a in ARCHITECTURES if a.converts_layout(keys)]
    if converting:
        return converting[0]
    components = {component for component, _ in parsed.paths}
    unnamed = components & {DENOISER, UNKNOWN}  # layouts that do not name the denoiser component
    components -= unnamed
    stems = list(parsed.stems)
    candidates = [
        a
        for a in ARCHITECTURES
        if components <= set(a.kohya_table)
        and all(any(stem.startswith(spelling.prefix) for spelling in a.kohya_table.values()) for stem in stems)
    ]
    # The closest fits (fewest components the file does not name) must write it alike: the same kohya names for
    # its components, the same denoiser. A `unet` + `text_encoder` file is SD1/2's, not SDXL's without its TE2.
    fewest = min((len(a.kohya_table) for a in candidates), default=0)
    candidates = [a for a in candidates if len(a.kohya_table) == fewest]
    spellings = {
        (tuple(repr(a.kohya_table[c]) for c in sorted(components)), a.denoiser_name if unnamed else None)
        for a in candidates
    }
    if not candidates or len(spellings) > 1:
        raise AdapterError(f"{path}: cannot tell which architecture this adapter is for; pass --base BASE")
    return candidates[0]


def _component_of_stem(stem: str, architecture: Architecture) -> str:
    """The component whose kohya prefix a stem starts with (the longest prefix wins)."""
    owners = [(len(s.prefix), c) for c, s in architecture.kohya_table.items() if stem.startswith(s.prefix)]
    return max(owners)[1] if owners else architecture.denoiser_name


def _match(parsed: ParsedAdapter, catalog: ModuleCatalog) -> tuple[AdapterTensors, list[str]]:
    tensors: AdapterTensors = {}
    unmatched: list[str] = []
    if parsed.stems:
        index = kohya_index(catalog)
        for stem, named in parsed.stems.items():
            key = index.get(stem)
            if key is None:
                unmatched.append(stem)
            else:
                _add(tensors, key, named, stem)
    for (component, path), named in parsed.paths.items():
        key = _resolve_path(catalog, component, path, parsed)
        if key is None:
            unmatched.append(f"{component}.{path}")
        else:
            _add(tensors, key, named, f"{component}.{path}")
    return tensors, sorted(set(unmatched))


def _add(tensors: AdapterTensors, key: ModuleKey, named: dict, name: str) -> None:
    if key in tensors:
        raise AdapterError(f"layer {name} names module {'.'.join(key)} a second time")
    tensors[key] = dict(named)


def kohya_index(catalog: ModuleCatalog) -> dict[str, ModuleKey]:
    """`{kohya stem: (component, module)}` for every module of the catalog and every alias of one."""
    table = catalog.architecture.kohya_table
    index: dict[str, ModuleKey] = {}
    for component, modules in catalog.modules().items():
        if component not in table:
            continue
        spelling = table[component]
        for alias, module in catalog.aliases.get(component, {}).items():
            index[spelling.stem(alias)] = (component, module)
        for module in modules:
            index[spelling.stem(module)] = (component, module)
    return index


def _resolve_path(catalog: ModuleCatalog, component: str, path: str, parsed: ParsedAdapter) -> ModuleKey | None:
    architecture = catalog.architecture
    if component == DENOISER:
        component = architecture.denoiser_name
    if component == UNKNOWN:  # a peft state dict: the component whose modules hold every path
        owners = [c for c in catalog.modules() if all(catalog.resolve(c, p) for _, p in parsed.paths)]
        component = owners[0] if owners else architecture.denoiser_name
    module = catalog.resolve(component, path)
    return None if module is None else (component, module)


def _fits(named: dict[str, torch.Tensor], shape: tuple[int, ...]) -> bool:
    """Whether a layer's tensors make an update of `shape` (on meta tensors: no arithmetic is done)."""
    from lora_cli.adapters.functional import delta_weight

    factors = {n: t if n == "alpha" else t.to("meta") for n, t in named.items() if n != "dora_scale"}
    try:
        delta_weight(factors, torch.Size(shape))
    except (RuntimeError, ValueError, IndexError, KeyError, TypeError):
        return False
    return "dora_scale" not in named or named["dora_scale"].numel() == shape[0]


def _via_diffusers(flat: dict[str, torch.Tensor], architecture: Architecture, path) -> dict[str, torch.Tensor]:
    """A layout of the architecture's community (e.g. Flux's original block names with fused q/k/v), converted
    by diffusers' own `lora_state_dict` for that pipeline into diffusers module names (alpha folded in)."""
    import diffusers

    loader = getattr(diffusers, architecture.pipeline_class).lora_state_dict
    prepared = architecture.prepare_for_diffusers_conversion(dict(flat))
    options = {"return_alphas": True} if "return_alphas" in inspect.signature(loader).parameters else {}
    try:
        converted = loader(prepared, **options)
    except (KeyError, ValueError, RuntimeError, AssertionError, IndexError) as exc:
        raise AdapterError(f"{path}: diffusers could not convert this layout ({str(exc)[:160]})") from None
    state = converted[0] if isinstance(converted, tuple) else converted
    alphas = converted[1] if isinstance(converted, tuple) and len(converted) > 1 else None
    result = dict(state)
    for name, alpha in (alphas or {}).items():
        result[name if name.endswith(".alpha") else f"{name}.alpha"] = torch.as_tensor(float(alpha))
    return result


def _peft_folder_config(folder: Path) -> str:
    config = folder / PEFT_CONFIG
    if not config.is_file():
        return "{}"
    try:
        return json.dumps(json.loads(config.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise AdapterError(f"{config}: not valid JSON") from None


def write_adapter(
    path: str | Path,
    tensors: AdapterTensors,
    ranks: dict[ModuleKey, int],
    algorithm: AdapterAlgorithm,
    file_format: FileFormat,
    architecture: Architecture,
    metadata: dict[str, str],
    kohya_table: KohyaTable | None = None,
) -> None:
    """Write the adapter atomically in the requested key layout, with `metadata` in the header (kohya names
    from `kohya_table` instead of the architecture's when given).

    `tensors` are in peft's convention; the kohya layout applies the algorithm's file convention
    (LyCORIS `dora_scale` shapes, LoKr scale folding) so A1111/ComfyUI compute the same update. The diffusers
    layout records rank and alpha where diffusers' loader reads them; the original layout is the architecture's
    own module names (HunyuanVideo's, which ComfyUI reads)."""
    from lora_cli.io.safetensors_file import save_tensors

    refused = algorithm.layout_refusal(file_format)
    if refused:
        raise AdapterError(refused)
    metadata = {**metadata, "lora_cli.format": file_format}
    if file_format == "kohya":
        exported = {key: algorithm.to_file(named, float(named["alpha"]), ranks[key]) for key, named in tensors.items()}
        flat = to_kohya(exported, kohya_table or architecture.kohya_table)
    elif file_format == "original":
        flat = architecture.original_layout(tensors)
    else:
        peft_names = {file: peft for peft, file in algorithm.tensor_names.items()}
        flat = to_diffusers({key: _peft_magnitude(named) for key, named in tensors.items()}, peft_names)
        metadata[DIFFUSERS_METADATA_KEY] = json.dumps(_diffusers_adapter_config(tensors), sort_keys=True)
    save_tensors(path, flat, metadata)


def _peft_magnitude(named: dict) -> dict:
    """peft stores a DoRA magnitude as (out,) for Linear and (1, out, 1, 1) for Conv2d."""
    if "dora_scale" not in named:
        return named
    conv = named["lora_down.weight"].dim() == 4
    return {**named, "dora_scale": named["dora_scale"].reshape((1, -1, 1, 1) if conv else (-1,))}


def _diffusers_adapter_config(tensors: AdapterTensors) -> dict[str, object]:
    """peft LoraConfig fields per component, prefixed the way diffusers' `save_lora_weights` writes them."""
    config: dict[str, object] = {}
    for component in sorted({c for c, _ in tensors}):
        modules = {m: named for (c, m), named in tensors.items() if c == component}
        ranks = {m: int(named["lora_down.weight"].shape[0]) for m, named in modules.items()}
        alphas = {m: float(named["alpha"]) for m, named in modules.items()}
        rank = max(set(ranks.values()), key=list(ranks.values()).count)
        alpha = max(set(alphas.values()), key=list(alphas.values()).count)
        config[f"{component}.r"] = rank
        config[f"{component}.lora_alpha"] = alpha
        config[f"{component}.target_modules"] = sorted(modules)
        config[f"{component}.rank_pattern"] = exact_pattern({m: r for m, r in ranks.items() if r != rank})
        config[f"{component}.alpha_pattern"] = exact_pattern({m: a for m, a in alphas.items() if a != alpha})
        config[f"{component}.use_dora"] = any("dora_scale" in named for named in modules.values())
    return config
