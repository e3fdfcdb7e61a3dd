"""Exceptions a user can meet. Each message says what was wrong and what to do.

Every layer may raise these; the CLI turns them into a one-line message and exit code 2.
"""


class LqkitError(Exception):
    """Base class for errors caused by user input (bad arguments, files, checkpoints)."""


class SpecError(LqkitError, ValueError):
    """A quantization / decomposition / plan specification is invalid."""


class DataError(LqkitError, ValueError):
    """A text or data file is missing, empty or too short."""


class CheckpointError(LqkitError):
    """A checkpoint is missing, corrupted, truncated or of an unknown format."""


class ModelLoadError(LqkitError):
    """A model could not be found or loaded."""
