"""Read a preset: YAML files with `extends`, command-line overrides, path resolution, validation.

Errors come out as one-line `PresetError`s that name the file, the key and the fix.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from lora_cli.config.migrations import migrate
from lora_cli.config.schema import Preset
from lora_cli.errors import PresetError, shown

# Keys whose values are paths; in a preset file they are relative to that file's folder.
# `model.path` and `model.config` may also be hub ids, so they are resolved only when they exist locally.
FILE_RELATIVE_KEYS = ("data.folder", "prior.folder", "distill.prompts", "transfer.adapter", "output.dir")
MAX_PRESET_BYTES = 1 << 20  # a preset is a few hundred lines; anything this large is a mistake or an attack
MAX_YAML_NODES = 100_000  # values a preset may expand to through YAML aliases
MAX_OVERRIDE_CHARACTERS = 10_000
MAYBE_LOCAL_KEYS = ("model.path", "model.config", "transfer.source")


def load_preset(path: str | Path, overrides: Iterable[str] = ()) -> Preset:
    """Load, merge and validate a preset file plus `section.key=value` overrides."""
    path = Path(path)
    try:
        raw = _read_with_extends(path, chain=())
    except OSError as exc:  # a path the file system refuses (too long, a loop, no permission)
        raise PresetError(f"{shown(str(path))}: cannot read it or a preset it extends ({exc.strerror})") from None
    for override in overrides:
        _apply_override(raw, override)
    return validate_preset(raw, source=str(path))


def validate_preset(raw: dict[str, Any], source: str) -> Preset:
    """Turn a merged raw mapping into a `Preset`, raising one readable `PresetError` on the first problem."""
    raw = migrate(dict(raw), source)
    try:
        return Preset.model_validate(raw)
    except ValidationError as exc:
        raise PresetError(f"{source}: {_describe(exc.errors()[0])}") from None


def preset_to_yaml(preset: Preset) -> str:
    """The resolved preset as YAML, the way `--dry-run` prints it and adapter metadata stores it."""
    return yaml.safe_dump(preset.model_dump(mode="json"), sort_keys=False)


def _read_with_extends(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(p.name for p in (*chain, path))
        raise PresetError(f"{path}: `extends` forms a cycle ({cycle}); remove one of the links")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    _resolve_paths(data, path.parent)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise PresetError(f"{path}: `extends` must be a file path, got {shown(parent)}")
    base = _read_with_extends(path.parent / parent, (*chain, path))
    return _deep_merge(base, data)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise PresetError(f"{path}: preset file not found; check the path")
    if path.stat().st_size > MAX_PRESET_BYTES:
        raise PresetError(
            f"{path}: {path.stat().st_size:,} bytes is not a preset (at most {MAX_PRESET_BYTES:,}); "
            "keep captions and prompt lists in files the preset names"
        )
    try:
        data = _bounded_yaml(path.read_text(encoding="utf-8"), str(path))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise PresetError(f"{path}: invalid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise PresetError(f"{path}: not UTF-8 text; save the preset as UTF-8") from None
    except RecursionError:
        raise PresetError(f"{path}: the YAML nests deeper than any preset does; write it out plainly") from None
    except ValueError as exc:  # a number too long to convert (Python's int limit)
        raise PresetError(f"{path}: a value cannot be read ({shown(str(exc))})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PresetError(f"{path}: a preset must be a mapping of sections (model:, data:, train: ...)")
    return data


def _bounded_yaml(text: str, source: str) -> Any:
    """`yaml.safe_load`, refusing documents whose aliases would expand past MAX_YAML_NODES values (a "billion
    laughs" preset): the node graph is composed and its expanded size counted (each node once) before anything
    is built."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_expansion(node, source)
            return loader.construct_document(node)
        return None
    finally:
        loader.dispose()


def _check_expansion(node: yaml.Node, source: str) -> None:
    sizes: dict[int, int] = {}

    def expanded(item: yaml.Node) -> int:
        if id(item) in sizes:
            return sizes[id(item)]
        sizes[id(item)] = MAX_YAML_NODES + 1  # a node inside itself (a recursive alias) never ends
        if isinstance(item, yaml.MappingNode):
            total = 1 + sum(expanded(key) + expanded(value) for key, value in item.value)
        elif isinstance(item, yaml.SequenceNode):
            total = 1 + sum(expanded(child) for child in item.value)
        else:
            total = 1
        sizes[id(item)] = min(total, MAX_YAML_NODES + 1)
        return sizes[id(item)]

    if expanded(node) > MAX_YAML_NODES:
        raise PresetError(
            f"{source}: the YAML expands to more than {MAX_YAML_NODES:,} values (aliases repeating anchors); "
            "write the preset out plainly"
        )


def _resolve_paths(data: dict[str, Any], folder: Path) -> None:
    for dotted in FILE_RELATIVE_KEYS + MAYBE_LOCAL_KEYS:
        section, key = dotted.split(".")
        values = data.get(section)
        if not isinstance(values, dict) or not isinstance(values.get(key), str):
            continue
        value = Path(values[key]).expanduser()
        candidate = value if value.is_absolute() else folder / value
        if dotted in FILE_RELATIVE_KEYS or candidate.exists() or values[key].startswith((".", "/", "~")):
            values[key] = os.path.normpath(candidate)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _apply_override(raw: dict[str, Any], override: str) -> None:
    dotted, sep, text = override.partition("=")
    where = f"--set {shown(override)}"
    if not sep or not dotted.strip():
        raise PresetError(f"{where}: expected section.key=value, e.g. --set train.steps=100")
    if len(override) > MAX_OVERRIDE_CHARACTERS:
        raise PresetError(f"{where}: longer than {MAX_OVERRIDE_CHARACTERS:,} characters; put it in the preset")
    *parents, leaf = dotted.strip().split(".")
    node = raw
    for name in parents:
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            raise PresetError(f"{where}: `{shown(name)}` is not a section")
        node = child
    try:
        node[leaf] = _bounded_yaml(text, where) if text.strip() else ""
    except (yaml.YAMLError, RecursionError, ValueError):
        node[leaf] = text


def _describe(error: dict[str, Any]) -> str:
    """One line for a pydantic error: where, what, and how to fix it."""
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc) if loc else "preset"
    if not key.isprintable() or len(key) > 60:
        key = shown(key)
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"unknown key `{key}`{_suggestion(loc)}"
    if kind == "missing":
        return f"missing required key `{key}`; add it to the preset"
    message = error["msg"].removeprefix("Value error, ")
    if kind in {"value_error", "assertion_error"} and not loc:
        return message
    got = error.get("input")
    echoed = "" if isinstance(got, dict) else f" (got {shown(got)})"
    return f"`{key}`: {message[:1].lower()}{message[1:]}{echoed}"


def _suggestion(loc: list[str]) -> str:
    model: type[BaseModel] = Preset
    for part in loc[:-1]:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None) if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    close = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1, cutoff=0.6)
    prefix = ".".join(loc[:-1])
    if close:
        return f" — did you mean `{prefix + '.' if prefix else ''}{close[0]}`?"
    names = list(model.model_fields)
    listed = ", ".join(names)
    if len(listed) > 120:
        return f"; valid keys here include {', '.join(names[:6])}, … (docs/presets.md lists them all)"
    return f"; valid keys here: {listed}"
