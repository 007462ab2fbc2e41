"""Training errors; all are MmjaxError, so the CLI prints one line and exits with status 2."""

from __future__ import annotations

from mmjax.errors import ConfigError, MmjaxError


class CheckpointError(MmjaxError, OSError):
    """A checkpoint could not be written or read (unwritable or full disk, corrupt files)."""


class IncompatibleCheckpointError(ConfigError):
    """The workdir holds a checkpoint of a different model or optimizer configuration."""


class NonFiniteLossError(MmjaxError, FloatingPointError):
    """The loss became NaN or infinite; training stopped before saving the bad state."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class DataError(MmjaxError, ValueError):
    """The dataset is empty or too small for the requested batch and sequence length."""
