"""Errors a user can cause. The CLI turns each into one line on stderr and exit code 2."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's first message line, shortened; its class name when the message is empty."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]


class UserError(Exception):
    """Bad input from the user: a path, a flag, a file. The message is the whole story."""


class CheckpointError(UserError):
    """A checkpoint that cannot be read, or does not fit the network."""


class DataError(UserError):
    """A dataset folder or image that cannot be used."""


class WriteError(UserError):
    """A file the system refused to write (disk full, read-only, no permission); nothing half-written is left."""


class TrainingStopped(Exception):
    """Training ended early on purpose or for a reason the user must act on; `exit_code` is what the CLI returns."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
