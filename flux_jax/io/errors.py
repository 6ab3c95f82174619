"""The errors our tools report to users: each message names the file, folder, key or setting at fault,
and every command-line tool prints it as one line (`flux_jax.io.cli.reported_errors`)."""


class UserError(Exception):
    """Bad input, or a run that cannot go on, described for the user rather than the programmer."""


class CheckpointError(UserError, ValueError):
    """A checkpoint or path that cannot be read or used."""


class OutputExistsError(UserError, FileExistsError):
    """An output that is there already and was not to be replaced."""
