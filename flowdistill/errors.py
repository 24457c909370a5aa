"""Exceptions that the CLI turns into one-line messages (no traceback)."""


class FlowDistillError(Exception):
    """Base class: a user-facing error with a one-line message."""


class ConfigError(FlowDistillError):
    """A config is invalid: unreadable or not YAML, unknown key, wrong type, missing or bad value."""


class CheckpointError(FlowDistillError):
    """A checkpoint is missing, incomplete or corrupt."""


class RunDirError(FlowDistillError):
    """The output directory cannot be used: it already holds a run (and neither --overwrite nor
    --resume was given), it is a file or lies under one, or it cannot be written."""


class PluginError(FlowDistillError):
    """A ``--plugin`` module could not be found or imported."""


class TrainingDiverged(FlowDistillError):
    """A loss became non-finite; training stopped and the last good checkpoint was kept."""
