"""How adapter files name an architecture's modules: the facts each architecture declares, not the conversion
machinery (that lives in `lora_cli.adapters`)."""

from __future__ import annotations

from dataclasses import dataclass

from lora_cli.errors import AdapterError


@dataclass(frozen=True)
class KohyaComponent:
    """How kohya spells one component's module names: a prefix, then the dotted path with `_` for `.`."""

    prefix: str
    # A leading module-path part the prefix already spells (transformers 5 CLIP has no `text_model.` level).
    drop: str = ""

    def stem(self, module: str) -> str:
        return self.prefix + module.removeprefix(self.drop).replace(".", "_")


KohyaTable = dict[str, KohyaComponent]


def text_model_aliases(modules: list[str]) -> dict[str, str]:
    """The other spelling of text-encoder module paths: checkpoints and adapters written with transformers 4
    name CLIP's modules `text_model.encoder…`, transformers 5 loads them as `encoder…` (its CLIPTextModel
    conversion mapping drops the level); `{alias: module}`."""
    return {
        (module.removeprefix("text_model.") if module.startswith("text_model.") else f"text_model.{module}"): module
        for module in modules
    }


def matching_layout(layouts: dict[str, str], keys: list[str]) -> str | None:
    """The name of the first layout whose key pattern (a regex) some key matches."""
    import re

    for name, pattern in layouts.items():
        if any(re.search(pattern, key) for key in keys):
            return name
    return None


def no_original_layout(architecture: str, default_format: str) -> AdapterError:
    """Why an architecture writes no `original` layout (the one ComfyUI needs for HunyuanVideo)."""
    return AdapterError(
        f"the original layout is HunyuanVideo's (what ComfyUI reads for it); {architecture} files load in ComfyUI "
        f"in the {default_format} layout"
    )
