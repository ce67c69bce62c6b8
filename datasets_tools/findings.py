"""A finding: one thing the dataset check noticed, how bad it is, where, why, and what to do."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

Severity = Literal["error", "warning", "info"]
SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


@dataclass(frozen=True)
class Finding:
    severity: Severity
    category: str  # file, pixels, caption, duplicate, variety, bucket, folder
    code: str  # a stable machine-readable name, e.g. "truncated", "near-duplicate"
    file: str
    reason: str
    fix: str

    def to_json(self) -> dict[str, str]:
        return asdict(self)

    def line(self) -> str:
        return f"{self.file}: {self.reason}; {self.fix}"
