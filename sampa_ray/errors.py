"""Errors the CLI reports in one line on stderr: those a user can cause (exit code 2), and a run
that failed on its own with a way to go on (exit code 1)."""


class UserError(Exception):
    """A bad value, path or argument supplied by the user; the message is one line."""

    exit_code = 2


class RunFailed(Exception):
    """A run that ended for a reason that is not the user's (its coordinator died): the
    message is one line saying what happened and how to go on; exit code 1."""

    exit_code = 1


def error_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def one_line(message: str) -> str:
    """The message as exactly one printable line: control characters (line breaks included)
    are shown escaped, so user-supplied text cannot split or forge output lines."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
