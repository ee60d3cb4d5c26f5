"""The algorithm family, as pure math on flat tensors (see ``base`` for the protocol), and the one
registry every backend, the configuration and the CLI find algorithms through.

A new algorithm is one class (a subclass of :class:`Algorithm` that says which worker serves each
of its roles in ``slots``) and one :func:`register` call; nothing else changes. Hyperparameters
are passed by name: :func:`create` gives the class the configuration values its ``__init__``
asks for (``lr`` is the schedule; ``momentum``, ``weight_decay``, ``rho``, ``lam`` ...). The base
optimizer every built-in algorithm hands its gradient to (``optimizer``: sgd or adamw, with
``beta1``, ``beta2``, ``eps``) is in ``optim``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from .base import LR, Algorithm, AlgoState, GradRequest
from .looksam import LookSAM
from .optim import OPTIMIZERS, AdamW, BaseOptimizer, SGDMomentum, make_optimizer
from .rst import RST
from .sam import ASAM, SAM
from .sampa import SAMPa
from .sgd import SGD

#: the algorithms ``compare`` runs by default, in the order comparisons show them
BUILTIN: tuple[str, ...] = ("sgd", "sam", "sampa")
#: the other SAM variants that ship with the package (``compare --algos`` adds them)
VARIANTS: tuple[str, ...] = ("looksam", "rst", "asam")

_REGISTRY: dict[str, type[Algorithm]] = {"sgd": SGD, "sam": SAM, "sampa": SAMPa,
                                         "looksam": LookSAM, "rst": RST, "asam": ASAM}


def baselines() -> tuple[str, ...]:
    """The data-parallel baselines ``compare --baseline ddp`` and the study run beside the
    built-ins (``sgd-ddp``, ``sam-ddp``): each built-in algorithm of one role, its gradient
    computed by all 2k workers together."""
    return tuple(f"{a}-ddp" for a in BUILTIN if len(set(_REGISTRY[a].slots.values())) == 1)


def register(name: str, cls: type[Algorithm]) -> None:
    """Make ``cls`` available as ``algo: name`` (config, CLI, every backend)."""
    if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
        raise TypeError(f"register({name!r}): {cls!r} is not an Algorithm subclass")
    if not cls.slots:
        raise TypeError(f"register({name!r}): {cls.__name__}.slots names no role")
    _REGISTRY[name] = cls


def unregister(name: str) -> None:
    """Forget a registered algorithm (those that ship with the package stay)."""
    if name not in shipped():
        _REGISTRY.pop(name, None)


def shipped() -> tuple[str, ...]:
    """The algorithms of the package itself (every process has them without shipping)."""
    return (*BUILTIN, *VARIANTS)


def registered() -> dict[str, type[Algorithm]]:
    """Every registered algorithm by name, the built-ins first."""
    return dict(_REGISTRY)


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def lookup(name: str) -> type[Algorithm]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"algo: unknown algorithm {name!r} (known: "
                         f"{', '.join(_REGISTRY)})") from None


def known(name: str, resolve: Callable[[str], Any]) -> str:
    """``name`` if it names an algorithm: a registered one, or an :class:`Algorithm` subclass
    by import path (``package.module:Class``: ``resolve`` imports it, and it is registered
    under that path, as a model plug-in is); else ValueError (a config field's one line)."""
    if name in _REGISTRY:
        return name
    if ":" in name:
        try:
            register(name, resolve(name))
        except TypeError as err:
            raise ValueError(str(err)) from None
        return name
    raise ValueError(f"unknown algorithm {name!r} (known: {', '.join(_REGISTRY)}; or an "
                     "Algorithm subclass as package.module:Class)")


def params_of(name: str, args: Mapping[str, Any], fields: Mapping[str, Any]) -> dict[str, Any]:
    """Algorithm ``name``'s own hyperparameters, validated by its ``Params`` model: from the
    config ``fields`` of the same names (``rho``, ``lam``), with ``args`` (``algo_args``) on
    top. A bad or unknown one is a ValueError naming ``algo_args.<name>``."""
    params = lookup(name).Params
    unknown = sorted(set(args) - set(params.model_fields))
    if unknown:
        raise ValueError(f"algo_args.{unknown[0]}: not a parameter of {name} (its parameters: "
                         f"{', '.join(params.model_fields) or 'none'})")
    given = {n: fields[n] for n in params.model_fields if n in fields}
    try:
        return params.model_validate({**given, **args}).model_dump()
    except ValidationError as err:
        e = err.errors()[0]
        raise ValueError(f"algo_args.{'.'.join(str(x) for x in e['loc'])}: {e['msg']}") from None


def create(name: str, lr: LR, hyper: Mapping[str, Any]) -> Algorithm:
    """An instance of the algorithm ``name`` with learning rate ``lr`` and, of ``hyper``, the
    values its ``__init__`` takes by name."""
    cls = lookup(name)
    params = inspect.signature(cls.__init__).parameters
    kw = {k: hyper[k] for k in params if k not in ("self", "lr") and k in hyper}
    return cls(lr=lr, **kw)


__all__ = ["ASAM", "BUILTIN", "OPTIMIZERS", "RST", "SAM", "SGD", "VARIANTS", "AdamW",
           "AlgoState", "Algorithm", "BaseOptimizer", "GradRequest", "LookSAM", "SAMPa",
           "SGDMomentum", "baselines", "create", "known", "lookup", "make_optimizer", "names",
           "params_of", "register", "registered", "shipped", "unregister"]
