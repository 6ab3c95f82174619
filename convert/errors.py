"""The one exception converters raise for bad input."""


class CheckpointError(ValueError):
    """A checkpoint or path that cannot be used; the message names the file, folder or key at fault."""
