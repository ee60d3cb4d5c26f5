"""Errors the CLI reports in one line on stderr: those a user can cause (exit code 2), and a run
that failed on its own with a way to go on (exit code 1)."""


class UserError(Exception):
    """A bad value, path or argument supplied by the user; the message is one line."""

    exit_code = 2


class RunFailed(Exception):
    """A run that ended for a reason that is not the user's (its coordinator died): the
    message is one line saying what happened and how to go on; exit code 1."""

    exit_code = 1


def one_line(message: str) -> str:
    """The message as exactly one printable line: control characters (line breaks included)
    are shown escaped, so user-supplied text cannot split or forge output lines."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
