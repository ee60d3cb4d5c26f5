"""Errors a user can cause. The CLI turns each into one line on stderr and exit code 2."""


class UserError(Exception):
    """A bad value, path or argument supplied by the user; the message is one line."""

    exit_code = 2


def one_line(message: str) -> str:
    """The message as exactly one printable line: control characters (line breaks included)
    are shown escaped, so user-supplied text cannot split or forge output lines."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
