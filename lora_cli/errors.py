"""Errors a user can act on. The CLI prints their message on one line and exits with their code."""

from __future__ import annotations


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
