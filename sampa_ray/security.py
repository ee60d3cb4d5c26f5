"""Who may talk to a coordinator: tokens, TLS files, loopback, the bearer check.

Both of the coordinator's listeners (the gRPC server and the metrics endpoint) follow one rule:
they bind to loopback unless told otherwise, and binding anywhere else requires a bearer token;
with a token every request must carry it, compared in constant time. The token comes from
``--token-file`` or ``$SAMPA_RAY_TOKEN``; TLS from a PEM certificate and key. This module is the
one place that reads those files and checks that header, so the two listeners and the control
CLI cannot drift apart.

Every problem a user can cause (a file that cannot be read, an empty token file) is a one-line
:class:`UserError` naming the flag or config field.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    from .config import TrainConfig

#: the environment variable holding the bearer token when no token file is given
TOKEN_ENV = "SAMPA_RAY_TOKEN"


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bearer_ok(header_value: str | bytes | None, token: str, *, strict: bool = False) -> bool:
    """Whether an ``Authorization`` value carries ``Bearer <token>``; the token is compared in
    constant time, so a wrong guess says nothing about how close it was.

    ``header_value`` is the value as received: bytes, or a str (UTF-8 in strict mode, the
    bytes-as-latin-1 strings of WSGI otherwise). ``strict``: the value must be exactly
    ``Bearer <token>`` (gRPC metadata, which our clients build with ``auth_metadata``);
    otherwise the scheme is case-insensitive and spaces around the parts are ignored, as HTTP
    clients differ there. An empty ``token`` matches nothing.
    """
    if not token:
        return False
    expected = token.encode("utf-8")
    if isinstance(header_value, bytes):
        header_value = header_value.decode("latin-1")
    value = header_value or ""
    if strict:
        return hmac.compare_digest(value.encode("utf-8", "replace"), b"Bearer " + expected)
    scheme, _, credentials = value.strip().partition(" ")
    # back to the bytes that were sent (WSGI hands headers over as latin-1 strings)
    match = hmac.compare_digest(credentials.strip().encode("latin-1", "replace"), expected)
    return match and scheme.lower() == "bearer"


# -- the coordinator's side: its config -----------------------------------------------------------
def read_tls(cfg: TrainConfig) -> tuple[bytes, bytes] | None:
    """(certificate PEM, key PEM) for the gRPC server, from --control-cert/--control-key."""
    if not cfg.control_cert or not cfg.control_key:
        return None
    out = []
    for field, path in (("control_cert", cfg.control_cert), ("control_key", cfg.control_key)):
        try:
            out.append(Path(path).read_bytes())
        except OSError as err:
            raise UserError(f"{field}: cannot read {path}: {err.strerror}") from None
    return out[0], out[1]


def read_token(cfg: TrainConfig) -> str | None:
    """The bearer token for the gRPC server: --token-file, else $SAMPA_RAY_TOKEN, else none."""
    if cfg.token_file:
        try:
            token = Path(cfg.token_file).read_text().strip()
        except OSError as err:
            raise UserError(f"token_file: cannot read {cfg.token_file}: {err.strerror}") from None
        if not token:
            raise UserError(f"token_file: {cfg.token_file} is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None


# -- the control CLI's side: its flags ------------------------------------------------------------
def _read_file(flag: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise UserError(f"{flag}: cannot read {path} ({err.strerror or err})") from None


def client_credentials(token_file: str | None, ca_cert: str | None
                       ) -> tuple[str | None, bytes | None]:
    """``(token, certificate PEM to trust)`` for a control client, from ``--token-file`` (else
    ``$SAMPA_RAY_TOKEN``; an empty file means no token) and ``--ca-cert`` (None: plaintext)."""
    token = os.environ.get(TOKEN_ENV) or None
    if token_file:
        token = _read_file("token-file", token_file).decode().strip() or None
    root_cert = _read_file("ca-cert", ca_cert) if ca_cert else None
    return token, root_cert


__all__ = [
    "TOKEN_ENV",
    "bearer_ok",
    "client_credentials",
    "is_loopback",
    "read_tls",
    "read_token",
]
