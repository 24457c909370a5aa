"""Exceptions that the CLI turns into one-line messages (no traceback)."""


class FlowDistillError(Exception):
    """Base class: a user-facing error with a one-line message."""


class ConfigError(FlowDistillError):
    """A config is invalid: unknown key, wrong type, missing value, bad value."""


class CheckpointError(FlowDistillError):
    """A checkpoint is missing, incomplete or corrupt."""


class RunDirError(FlowDistillError):
    """The output directory already holds a run (and neither --overwrite nor --resume was given)."""


class TrainingDiverged(FlowDistillError):
    """A loss became non-finite; training stopped and the last good checkpoint was kept."""
