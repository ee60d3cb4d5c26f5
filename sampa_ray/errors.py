"""Errors a user can cause. The CLI turns each into one line on stderr and exit code 2."""


class UserError(Exception):
    """A bad value, path or argument supplied by the user; the message is one line."""

    exit_code = 2
