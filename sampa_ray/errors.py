"""Errors the CLI reports in one line on stderr: those a user can cause (exit code 2), and a run
that failed on its own with a way to go on (exit code 1)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


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


#: the most characters the field messages of one error line take before later fields are named
#: without their messages (every failing field is still named)
ERROR_DETAIL_CHARS = 300
#: the most characters of a rejected value shown after "got"
VALUE_CHARS = 60


def _field_error(e: Mapping[str, Any]) -> str:
    """One failing field as ``loc: message, got value`` (a whole-model check's own message)."""
    msg = e["msg"].removeprefix("Value error, ")
    if not e["loc"]:  # a whole-model check: its message already names the field
        return msg
    loc = ".".join(str(p) for p in e["loc"])
    value = ""
    if e["type"] != "extra_forbidden" and "input" in e and not isinstance(e["input"], dict):
        shown = repr(e["input"])
        if len(shown) > VALUE_CHARS:
            shown = shown[:VALUE_CHARS - 3] + "..."
        value = f", got {shown}"
    return f"{loc}: {msg}{value}"


def validation_line(errors: Sequence[Mapping[str, Any]]) -> str:
    """Every failing field of a pydantic ``ValidationError.errors()`` in one line,
    ``lr: ...; rho: ...``: a user who fixes one field should not discover the next only on the
    next try. One entry per field (a union's alternatives each fail on their own); when the
    messages grow past :data:`ERROR_DETAIL_CHARS`, the remaining fields are named without
    theirs."""
    by_field: dict[str, str] = {}
    for e in errors:
        name = str(e["loc"][0]) if e["loc"] else ""
        by_field.setdefault(name, _field_error(e))
    parts = list(by_field.values())
    line = "; ".join(parts)
    if len(line) <= ERROR_DETAIL_CHARS:
        return line
    names = [name or "config" for name in by_field]
    shown = [parts[0]]  # the first field's message always, however long
    for part in parts[1:]:
        rest = names[len(shown) + 1:]
        tail = f"; also invalid: {', '.join(rest)}" if rest else ""
        if len("; ".join([*shown, part]) + tail) > ERROR_DETAIL_CHARS:
            break
        shown.append(part)
    rest = names[len(shown):]
    return "; ".join(shown) + (f"; also invalid: {', '.join(rest)}" if rest else "")
