"""Exceptions raised by voxtext, each naming what was wrong and how to fix it."""


class VoxTextError(Exception):
    """Base class of every error voxtext raises on purpose."""


class InputError(VoxTextError, ValueError):
    """The volume, prompt or option given by the user cannot be used."""


class CheckpointError(VoxTextError):
    """A checkpoint folder is missing, corrupt or does not match the model."""


class WeightsNotFoundError(CheckpointError, FileNotFoundError):
    """Weights are not in the cache and cannot be downloaded (offline)."""


class Cancelled(VoxTextError):
    """The user cancelled a running job; nothing was written."""
