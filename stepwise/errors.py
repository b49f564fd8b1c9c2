"""The project's error types: each carries one message that says what is wrong and how to fix it."""


class StepwiseError(Exception):
    """Base class: stages print the message alone (no traceback) and exit with status 2."""


class ConfigError(StepwiseError, ValueError):
    """An invalid parameter: unknown name, value out of range, inconsistent settings."""


class DataError(StepwiseError):
    """Missing, corrupt or wrongly shaped input data."""


class CheckpointError(StepwiseError):
    """A checkpoint that is truncated, corrupt or incompatible with the configured model."""


class DiskFullError(StepwiseError):
    """A write that failed for lack of disk space or quota; the previous file, if any, is left as it was."""


class OutputLockedError(StepwiseError):
    """An output folder that another live process (named by its PID) is writing."""
