"""Errors a user can act on. The CLI prints their message on one line and exits with their code."""

from __future__ import annotations

SHOWN_CHARACTERS = 100  # the most of a user's value an error message echoes (messages stay near one line)


def shown(value: object) -> str:
    """A value as an error message echoes it: its repr, cut to SHOWN_CHARACTERS."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARACTERS else f"{text[:SHOWN_CHARACTERS]}… ({len(text):,} characters)"


def printable(name: str) -> str:
    """A name read from a user's file (a tensor key, a layer) as a message shows it: as it is when it is printable
    and short, else like `shown`."""
    return name if name.isprintable() and len(name) <= SHOWN_CHARACTERS else shown(name)


class LoraCliError(Exception):
    """Base for every error caused by user input or the environment, never by a bug."""

    exit_code = 2
    label = "error"


class PresetError(LoraCliError):
    """The preset file or an override is invalid."""


class ModelLoadError(LoraCliError):
    """The base model cannot be found or loaded."""


class DatasetError(LoraCliError):
    """The dataset folder cannot be used for training."""


class AdapterError(LoraCliError):
    """An adapter file or adapter configuration is invalid or does not fit the base."""


class SamplingError(LoraCliError):
    """Drawing images went wrong in a way the user can change (steps, adapter scales)."""


class CheckpointError(LoraCliError):
    """A training checkpoint is missing, damaged or incompatible."""


class OutputExistsError(LoraCliError):
    """Writing would overwrite results of an earlier run."""


class OutputWriteError(LoraCliError):
    """An output could not be written (disk full, permissions); earlier outputs are intact."""


class TrainingDivergedError(LoraCliError):
    """The loss or gradients became non-finite."""

    exit_code = 3


class TrainingInterrupted(LoraCliError):
    """The user stopped the run (Ctrl-C or SIGTERM); a checkpoint was saved."""

    exit_code = 130
    label = "stopped"
