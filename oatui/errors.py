"""The one exception type that reaches the user as a single line and exit status 2."""

from __future__ import annotations

EXIT_USAGE = 2


class UserError(Exception):
    """Bad input from the user: a file, a line, an option, and what is wrong with it.

    The command line prints ``str(error)`` on one line of stderr and exits with status 2.
    Raise it before anything is written, so that nothing already on disk is damaged.
    """

    def __init__(self, message: str) -> None:
        # One line, whatever the message was built from.
        super().__init__(" ".join(str(message).split()))
