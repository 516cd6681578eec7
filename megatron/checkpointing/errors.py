"""The one error type of the checkpointing package."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the path and the problem."""
