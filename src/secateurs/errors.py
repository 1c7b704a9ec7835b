"""Exceptions raised for bad input. One base class so callers (and the CLI) can catch them all."""


class SecateursError(Exception):
    """Base class: a user-facing problem with a clear message (the CLI prints no traceback)."""


class ConfigError(SecateursError, ValueError):
    """An option, ratio, plan or recipe is invalid."""


class UnsupportedModelError(SecateursError, ValueError):
    """The model's architecture has no adapter, or the adapter lacks a needed feature."""


class DataError(SecateursError, ValueError):
    """Calibration or evaluation data is missing, empty or malformed."""


class ModelNotFoundError(SecateursError, FileNotFoundError):
    """A model path, alias or hub id cannot be resolved."""


class OutputExistsError(SecateursError, FileExistsError):
    """The output directory exists and overwriting was not asked for."""


class ScoreError(SecateursError, ValueError):
    """A criterion produced NaN/inf or otherwise unusable scores."""


class OutputError(SecateursError, OSError):
    """The output location cannot be written (read-only, disk full, another writer holds it)."""


class ModelFileError(SecateursError, ValueError):
    """A model's files are unreadable: config.json not JSON, truncated weights, non-finite
    weights."""
