"""Run a command so known errors become one line on stderr and an exit code, never a traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from lora_cli.errors import LoraCliError

DEBUG_VARIABLE = "LORA_CLI_DEBUG"
OUT_OF_MEMORY_EXIT = 4


def run_app(app: Callable[..., object], prog_name: str) -> None:
    """Call a typer app; LoraCliError -> `error: ...` (or its label) and its exit code
    (LORA_CLI_DEBUG=1 shows tracebacks)."""
    try:
        app(prog_name=prog_name, standalone_mode=True)
    except LoraCliError as exc:
        if os.environ.get(DEBUG_VARIABLE):
            raise
        print(f"{exc.label}: {one_line(str(exc))}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        if os.environ.get(DEBUG_VARIABLE) or not _out_of_memory(exc):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(
            f"error: out of GPU memory ({first}); `lora-train PRESET --plan --vram SIZE` proposes settings that fit "
            "(docs/memory-planner.md)",
            file=sys.stderr,
        )
        sys.exit(OUT_OF_MEMORY_EXIT)


def one_line(message: str) -> str:
    """A message on one line, whatever a user's value put in it (line breaks become spaces)."""
    return " ".join(message.split()) if not message.isprintable() else message


def _out_of_memory(exc: Exception) -> bool:
    import torch  # already imported by any command that can run out of memory

    return isinstance(exc, torch.OutOfMemoryError)
