"""The base of every preset section."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A preset section: unknown keys are errors, values are checked on assignment too."""

    # Every float must be finite: no preset key gives `.inf` or `.nan` a meaning.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
