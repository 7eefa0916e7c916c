"""Errors a user can cause. The CLI turns each into one line on stderr and exit code 2."""


class UserError(Exception):
    """Bad input from the user: a path, a flag, a file. The message is the whole story."""


class CheckpointError(UserError):
    """A checkpoint that cannot be read, or does not fit the network."""


class DataError(UserError):
    """A dataset folder or image that cannot be used."""
