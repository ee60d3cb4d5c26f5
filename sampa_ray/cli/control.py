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
from typing import Any

from ..security import TOKEN_ENV, client_credentials
from ..transport.grpc.client import get_status, request_checkpoint, request_stop, watch


def _auth(args: argparse.Namespace) -> tuple[str | None, bytes | None]:
    return client_credentials(args.token_file, args.ca_cert)


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


__all__ = [
    "add_control_commands",
    "cmd_checkpoint",
    "cmd_status",
    "cmd_stop",
    "cmd_watch",
]
