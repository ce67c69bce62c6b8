"""Run a command so known errors become one line on stderr and an exit code, never a traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from lora_cli.errors import LoraCliError

DEBUG_VARIABLE = "LORA_CLI_DEBUG"


def run_app(app: Callable[..., object], prog_name: str) -> None:
    """Call a typer app; LoraCliError -> `error: ...` (or its label) and its exit code
    (LORA_CLI_DEBUG=1 shows tracebacks)."""
    try:
        app(prog_name=prog_name, standalone_mode=True)
    except LoraCliError as exc:
        if os.environ.get(DEBUG_VARIABLE):
            raise
        print(f"{exc.label}: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
