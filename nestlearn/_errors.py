"""Errors that name what is wrong: the field, the file or the value."""


class NestlearnError(Exception):
    """Base of every error nestlearn raises on purpose; the CLI prints its message on one line."""


class ConfigError(NestlearnError, ValueError):
    """A configuration field is unknown, mistyped or out of range."""


class DataError(NestlearnError, ValueError):
    """A data file is missing or corrupt, or a dataset cannot supply what was asked of it."""


class CheckpointError(NestlearnError):
    """No checkpoint of a run can be trusted (every one is damaged), or one cannot be read back."""


class OperatingError(NestlearnError, OSError):
    """The machine refused an operation: a full disk, a read-only or missing directory, a file in the way."""


class Preempted(NestlearnError):
    """The run was told to stop (SIGTERM, a preemption notice) and stopped at a chunk boundary.

    Its checkpoint is saved: ``--resume`` (``resume=True``) continues the run exactly. Attributes:
    ``step``, the checkpoint saved (``None`` if the run had no checkpoints to save to).
    """

    def __init__(self, message: str, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step
