"""``sampa-ray status|watch|checkpoint|stop --target HOST:PORT``: the operator's side of a
running coordinator's control plane.

The calls themselves live in :mod:`sampa_ray.transport.grpc.client` and the token and
certificate files are read by :mod:`sampa_ray.security`; this module only turns flags into those
calls and their answers into lines (or JSON). Every failure a user can cause is a one-line
:class:`~sampa_ray.errors.UserError`.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from ..security import TOKEN_ENV, client_credentials
from ..transport.grpc.client import get_status, request_checkpoint, request_stop, watch


def _auth(args: argparse.Namespace) -> tuple[str | None, bytes | None]:
    return client_credentials(args.token_file, args.ca_cert)


def _seconds(text: str) -> float:
    """An argparse type: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _count(text: str) -> int:
    """An argparse type: a whole number, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else "-"
    return str(v)


def json_safe(v: Any) -> Any:
    """``v`` with every NaN or infinity as None, so that ``json.dumps`` writes valid JSON
    (``null``) where the status has no number yet (no loss before the first round, no accuracy
    before the first evaluation)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [json_safe(x) for x in v]
    return v


def _dumps(v: Any, **kw: Any) -> str:
    return json.dumps(json_safe(v), allow_nan=False, **kw)


def cmd_status(args: argparse.Namespace) -> int:
    token, root_cert = _auth(args)
    st = get_status(args.target, args.timeout, token, root_cert)
    if args.json:
        print(_dumps(st, indent=2))
        return 0
    print(f"run {st['run_id']}  {st['algorithm']}  {st['state']}  step {st['step']}"
          f"/{st['total_steps']}  epoch {_fmt(st['epoch'])}  loss {_fmt(st['loss'])}  "
          f"accuracy {_fmt(st['accuracy'])}")
    if st["state"] == "running":
        age = f"last round {st['round_age_seconds']:.1f}s ago"
        print(f"STALLED: {age}, far longer than a round takes" if st["stalled"] else age)
    print(f"transport {st['transport']}  metrics port {st['metrics_port'] or '-'}")
    for w in st["workers"]:
        busy = f" for {w['busy_seconds']:.1f}s" if w["state"] in ("computing", "stalled") else ""
        print(f"  worker {w['name']}: {w['state']}{busy}  pid {w['pid']}  {w['device']}")
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
    get_status(args.target, args.timeout, token, root_cert)  # reachable: within --timeout
    reply = request_checkpoint(args.target, args.wait, token, root_cert)
    print(reply["path"])
    return 0


def _event_line(ev: dict[str, Any]) -> str:
    kind = ev["kind"] or "event"
    if kind == "info":
        return f"[info] {ev['text']}"
    acc = ev.get("test_accuracy")
    line = (f"[{kind}] step {ev['step']}/{ev['total']}  epoch {_fmt(ev['epoch'])}  "
            f"loss {_fmt(ev['loss'])}")
    if ev.get("accuracy") is not None:
        line += f"  acc {_fmt(ev['accuracy'])}"
    if acc is not None:
        line += f"  test acc {_fmt(acc)}"
    if kind == "round":
        line += f"  round {ev['round_seconds'] * 1e3:.1f} ms"
    return f"{line} {ev['text']}".rstrip()


def cmd_watch(args: argparse.Namespace) -> int:
    token, root_cert = _auth(args)
    get_status(args.target, args.timeout, token, root_cert)  # reachable: within --timeout
    for ev in watch(args.target, args.n, None, token, root_cert):
        print(_dumps(ev) if args.json else _event_line(ev), flush=True)
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
        p.add_argument("--timeout", type=_seconds, default=5.0, metavar="SECONDS",
                       help="seconds to wait for the coordinator to answer (default: 5)")

    p = subparsers.add_parser("status", help="status of a running coordinator")
    common(p)
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(func=cmd_status)
    p = subparsers.add_parser("watch", help="follow a running coordinator's progress")
    common(p)
    p.add_argument("-n", type=_count, default=0, metavar="N",
                   help="stop after N events (default: until the run ends)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_watch)
    p = subparsers.add_parser("checkpoint", help="have a running coordinator write a checkpoint")
    common(p)
    p.add_argument("--wait", type=_seconds, default=120.0, metavar="SECONDS",
                   help="seconds to wait, once connected, for the checkpoint to be written "
                   "(default: 120)")
    p.set_defaults(func=cmd_checkpoint)
    p = subparsers.add_parser("stop", help="finish the current round, write outputs, exit")
    common(p)
    p.set_defaults(func=cmd_stop)


__all__ = [
    "add_control_commands",
    "json_safe",
    "cmd_checkpoint",
    "cmd_status",
    "cmd_stop",
    "cmd_watch",
]
