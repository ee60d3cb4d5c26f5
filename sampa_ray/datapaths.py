"""The one list of data paths and transports: how points, gradients and state move on the Ray
backend. The config's allowed values, the CLI's choices, the study's grid and the coordinator's
choice of path all read it. Nothing here imports Ray or torch: a config is checked without them.

A data path on a transport is one entry: its name, the transport it moves data over, its
coordinator half (``module:Class``, imported where a run starts, or the class itself; the class
names its worker half), whether it serves role groups of several workers, and whether
``data_path: auto`` picks it on that transport. Adding a data path is its module and one
:func:`register_path` line; a transport is one :func:`register_transport` line and the paths that
use it. Entries registered in the driver travel to the coordinator with the run
(:func:`sampa_ray.plugins.shipped`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PathEntry:
    """A data path on a transport (see the module's docstring)."""

    name: str
    transport: str
    half: str | type
    groups: bool = True
    default: bool = False


_TRANSPORTS: dict[str, str] = {}
_ENTRIES: dict[tuple[str, str], PathEntry] = {}
_BUILTIN: set[tuple[str, str]] = set()


def register_transport(name: str, what: str) -> None:
    """Make ``--transport name`` known (``what`` it carries data over, for ``--help``)."""
    _TRANSPORTS[name] = what


def register_path(name: str, transport: str, half: str | type, *, groups: bool = True,
                  default: bool = False) -> None:
    """Make ``--data-path name`` known on ``transport`` (see :class:`PathEntry`)."""
    if transport not in _TRANSPORTS:
        raise ValueError(f"register_path({name!r}): unknown transport {transport!r}")
    if name == "auto":
        raise ValueError("register_path: 'auto' picks a path; it is not one")
    _ENTRIES[(name, transport)] = PathEntry(name, transport, half, groups, default)


def unregister_path(name: str, transport: str) -> None:
    """Forget a registered data path (the built-in ones stay)."""
    if (name, transport) not in _BUILTIN:
        _ENTRIES.pop((name, transport), None)


def transports() -> tuple[str, ...]:
    return tuple(_TRANSPORTS)


def names(transport: str | None = None) -> tuple[str, ...]:
    """The data paths (on ``transport``, where given), each once, in registration order."""
    return tuple(dict.fromkeys(n for (n, t) in _ENTRIES if transport in (None, t)))


def entry(name: str, transport: str) -> PathEntry | None:
    """The entry ``data_path: name`` (``auto``: the transport's default) selects on
    ``transport``; None where there is none."""
    if name == "auto":
        return next((e for e in _ENTRIES.values() if e.transport == transport and e.default),
                    None)
    return _ENTRIES.get((name, transport))


def check(name: str, transport: str, grouped: str | None = None) -> PathEntry:
    """The entry for ``name`` on ``transport``, or ValueError (a config field's one line):
    an unknown transport or path, a path the transport does not carry, or role groups
    (``grouped``: the field that asks for them) on a path that serves one worker per role."""
    if transport not in _TRANSPORTS:
        raise ValueError(f"transport: unknown {transport!r} (choose from "
                         f"{', '.join(_TRANSPORTS)})")
    if name != "auto" and name not in names():
        raise ValueError(f"data_path: unknown {name!r} (choose from auto, {', '.join(names())})")
    e = entry(name, transport)
    if e is None:
        raise ValueError(f"data_path: {name} does not run on --transport {transport} (there: "
                         f"{', '.join(names(transport))}, or auto)")
    if grouped and not e.groups:
        raise ValueError(f"{grouped}: the {e.name} path on --transport {transport} serves one "
                         "worker per role; with role groups use a path that serves groups ("
                         f"{', '.join(f'{p.name} on {p.transport}' for p in _grouped())})")
    return e


def _grouped() -> list[PathEntry]:
    return [e for e in _ENTRIES.values() if e.groups]


def combos(transports_: Iterable[str], paths: Iterable[str],
           grouped: bool = False) -> list[tuple[str, str]]:
    """The (transport, data path) pairs that exist among those given (for role groups, the
    ones that serve groups)."""
    return [(t, p) for t in transports_ for p in paths
            if (e := _ENTRIES.get((p, t))) is not None and (e.groups or not grouped)]


def registered() -> dict[tuple[str, str], PathEntry]:
    """The entries registered beyond the built-ins (what travels to the coordinator)."""
    return {k: e for k, e in _ENTRIES.items() if k not in _BUILTIN}


def install(entries: dict[tuple[str, str], Any]) -> None:
    """Register entries shipped from the driver."""
    _ENTRIES.update(entries)


register_transport("ray", "Ray's object store (or torch.distributed, for collective)")
register_transport("grpc", "gRPC streams to and from the coordinator")
register_path("points", "ray", "sampa_ray.ray.paths.points:PointsPath")
register_path("replicated", "ray", "sampa_ray.ray.paths.replicated:ReplicatedPath")
register_path("collective", "ray", "sampa_ray.ray.paths.collective:CollectivePath")
register_path("free", "ray", "sampa_ray.ray.paths.free:FreePath", default=True)
register_path("points", "grpc", "sampa_ray.ray.paths.grpc:GrpcPath", groups=False,
              default=True)
_BUILTIN.update(_ENTRIES)

__all__ = ["PathEntry", "check", "combos", "entry", "install", "names", "register_path",
           "register_transport", "registered", "transports", "unregister_path"]
