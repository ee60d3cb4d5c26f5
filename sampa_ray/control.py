"""Talk to a running coordinator over its gRPC control plane (``sampa.v1.CoordinatorService``).

Backs ``sampa-ray status|watch|checkpoint|stop --target HOST:PORT``. Every failure a user can
cause (bad target, nothing listening, wrong token) raises :class:`UserError` with one line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from .errors import UserError
from .proto.sampa.v1 import coordinator_service_pb2 as cpb
from .proto.sampa.v1 import coordinator_service_pb2_grpc as cgrpc
from .transport.grpc_client import auth_metadata, make_channel

TOKEN_ENV = "SAMPA_RAY_TOKEN"
T = TypeVar("T")


def check_target(target: str) -> str:
    """``target`` if it reads HOST:PORT (``[v6addr]:PORT`` for IPv6), else UserError."""
    m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})", target or "")
    if not m or not 0 < int(m.group(2)) < 65536:
        raise UserError(f"target: expected HOST:PORT, got {target!r}")
    return target


def _reason(err: grpc.RpcError) -> str:
    details = (err.details() or "") if isinstance(err, grpc.Call) else str(err)
    low = details.lower()
    if "refused" in low:
        return "connection refused"
    if "dns" in low or "resolve" in low or "name or service not known" in low:
        return "host name not resolved"
    if "handshake" in low or "ssl" in low or "certificate" in low:
        return "TLS handshake failed"
    last = details.strip().splitlines()[0] if details.strip() else "unavailable"
    return last.rsplit(": ", 1)[-1].strip().lower() or "unavailable"


def _user_error(target: str, err: grpc.RpcError, timeout: float | None) -> UserError:
    code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
    if code == grpc.StatusCode.UNAVAILABLE:
        return UserError(f"target: cannot reach {target} ({_reason(err)})")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        within = f"within {timeout:g}s" if timeout else "in time"
        return UserError(f"target: cannot reach {target} (no answer {within})")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return UserError(f"token: {target} refused the call (missing or wrong token)")
    details = (err.details() or "").strip().splitlines() if isinstance(err, grpc.Call) else []
    return UserError(f"target: {target} answered {code.name}: "
                     f"{details[0] if details else 'no details'}")


def _call(target: str, timeout: float | None, token: str | None, root_cert: bytes | None,
          fn: Callable[[cgrpc.CoordinatorServiceStub, Any], T]) -> T:
    check_target(target)
    with make_channel(target, root_cert) as channel:
        stub = cgrpc.CoordinatorServiceStub(channel)
        try:
            return fn(stub, {"timeout": timeout, "metadata": auth_metadata(token)})
        except grpc.RpcError as err:
            raise _user_error(target, err, timeout) from None


def message_dict(msg: Message) -> dict[str, Any]:
    """A protobuf message as a plain dict (unset optional fields are None)."""
    out: dict[str, Any] = {}
    for f in msg.DESCRIPTOR.fields:
        value = getattr(msg, f.name)
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            out[f.name] = dict(value)
        elif f.is_repeated:
            out[f.name] = [message_dict(v) if f.message_type else v for v in value]
        elif f.message_type is not None:
            out[f.name] = message_dict(value) if msg.HasField(f.name) else None
        elif f.has_presence and not msg.HasField(f.name):
            out[f.name] = None
        else:
            out[f.name] = value
    return out


def get_status(target: str, timeout: float = 5.0, token: str | None = None,
               root_cert: bytes | None = None) -> dict[str, Any]:
    """The coordinator's status (keys of ``StatusReply``; ``workers`` a list of dicts)."""
    return _call(target, timeout, token, root_cert,
                 lambda stub, kw: message_dict(stub.GetStatus(cpb.StatusRequest(), **kw)))


def request_stop(target: str, timeout: float = 5.0, token: str | None = None,
                 root_cert: bytes | None = None) -> dict[str, Any]:
    """Ask the coordinator to finish the current round, write its outputs and exit:
    ``{"accepted": bool}``."""
    return _call(target, timeout, token, root_cert,
                 lambda stub, kw: message_dict(stub.Stop(cpb.StopRequest(), **kw)))


def request_checkpoint(target: str, timeout: float = 120.0, token: str | None = None,
                       root_cert: bytes | None = None) -> dict[str, Any]:
    """Ask the coordinator to write a checkpoint: ``{"path": str}`` (on its node)."""
    return _call(target, timeout, token, root_cert,
                 lambda stub, kw: message_dict(stub.Checkpoint(cpb.CheckpointRequest(), **kw)))


def watch(target: str, n_events: int = 0, timeout: float | None = None,
          token: str | None = None, root_cert: bytes | None = None
          ) -> Iterator[dict[str, Any]]:
    """Progress events as they happen (keys of ``ProgressEvent``): ``n_events`` of them, or
    until the run ends when 0. ``timeout`` (seconds) bounds the whole watch."""
    check_target(target)
    with make_channel(target, root_cert) as channel:
        stub = cgrpc.CoordinatorServiceStub(channel)
        call = stub.WatchProgress(cpb.WatchRequest(max_events=max(0, n_events)),
                                  timeout=timeout, metadata=auth_metadata(token))
        try:
            for ev in call:
                yield message_dict(ev)
        except grpc.RpcError as err:
            raise _user_error(target, err, timeout) from None
        finally:
            call.cancel()


# -- command line --------------------------------------------------------------------------------
def _read_file(flag: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise UserError(f"{flag}: cannot read {path} ({err.strerror or err})") from None


def _auth(args: argparse.Namespace) -> tuple[str | None, bytes | None]:
    token = os.environ.get(TOKEN_ENV) or None
    if args.token_file:
        token = _read_file("token-file", args.token_file).decode().strip() or None
    root_cert = _read_file("ca-cert", args.ca_cert) if args.ca_cert else None
    return token, root_cert


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def cmd_status(args: argparse.Namespace) -> int:
    token, root_cert = _auth(args)
    st = get_status(args.target, args.timeout, token, root_cert)
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(f"run {st['run_id']}  {st['algorithm']}  {st['state']}  step {st['step']}"
          f"/{st['total_steps']}  epoch {_fmt(st['epoch'])}  loss {_fmt(st['loss'])}  "
          f"accuracy {_fmt(st['accuracy'])}")
    print(f"transport {st['transport']}  metrics port {st['metrics_port'] or '-'}")
    for w in st["workers"]:
        print(f"  worker {w['name']}: {w['state']}  pid {w['pid']}  {w['device']}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    token, root_cert = _auth(args)
    reply = request_stop(args.target, args.timeout, token, root_cert)
    if reply["accepted"]:
        print(f"{args.target}: stopping after the current round (outputs will be written)")
        return 0
    print(f"{args.target}: the coordinator declined to stop")
    return 1


def cmd_checkpoint(args: argparse.Namespace) -> int:
    token, root_cert = _auth(args)
    reply = request_checkpoint(args.target, max(args.timeout, 60.0), token, root_cert)
    print(reply["path"])
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    token, root_cert = _auth(args)
    for ev in watch(args.target, args.n, None, token, root_cert):
        if args.json:
            print(json.dumps(ev), flush=True)
        else:
            print(f"[{ev['kind'] or 'event'}] step {ev['step']}/{ev['total']}  "
                  f"epoch {_fmt(ev['epoch'])}  loss {_fmt(ev['loss'])}  "
                  f"round {ev['round_seconds'] * 1e3:.1f} ms {ev['text']}".rstrip(), flush=True)
    return 0


def add_control_commands(subparsers: Any) -> None:
    """Add ``status``, ``watch``, ``checkpoint`` and ``stop`` to a CLI's subparsers; each sets
    ``func`` (args -> exit code) via ``set_defaults``."""
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--target", required=True, metavar="HOST:PORT",
                       help="the coordinator's control address")
        p.add_argument("--token-file", metavar="FILE",
                       help=f"file holding the bearer token (default: ${TOKEN_ENV})")
        p.add_argument("--ca-cert", metavar="FILE.pem",
                       help="certificate to trust for TLS (plaintext when not given)")
        p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                       help="seconds to wait for an answer (default: 5)")

    p = subparsers.add_parser("status", help="status of a running coordinator")
    common(p)
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(func=cmd_status)
    p = subparsers.add_parser("watch", help="follow a running coordinator's progress")
    common(p)
    p.add_argument("-n", type=int, default=0, metavar="N",
                   help="stop after N events (default: until the run ends)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_watch)
    p = subparsers.add_parser("checkpoint", help="have a running coordinator write a checkpoint")
    common(p)
    p.set_defaults(func=cmd_checkpoint)
    p = subparsers.add_parser("stop", help="finish the current round, write outputs, exit")
    common(p)
    p.set_defaults(func=cmd_stop)
