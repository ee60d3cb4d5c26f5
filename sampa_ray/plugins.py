"""Plug-ins: the user's model factory, dataset factory and loss, named by import path
(``package.module:function``) or handed in as Python objects (:func:`sampa_ray.fit`).

A name is only checked for its form when a config is built; the object is imported where it is
used (:func:`resolve`), with the current directory on ``sys.path`` as a command run from a
project folder expects. Objects resolved or registered in the driver are shipped to the Ray
coordinator and workers by value (:func:`registered`), so their module need not be importable
there, and into the run folder (:func:`save_parts`), so :func:`sampa_ray.load` rebuilds the model
in any process, from any directory. Any callable will do: a function of the training script
(``__main__``), a lambda, a closure or a ``functools.partial`` is named by what it is and a
digest of its pickled value. Nothing here imports torch or Ray.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import cloudpickle

from .errors import UserError

#: the built-in image models (``sampa_ray.models.build_model``) and datasets (``sampa_ray.data``)
BUILTIN_MODELS: tuple[str, ...] = ("resnet20", "resnet56", "wrn28_2", "wrn28_10", "vgg19_bn",
                                   "mlp", "cnn")
BUILTIN_DATASETS: tuple[str, ...] = ("digits", "cifar10", "cifar100", "synthetic")
#: built-in names served by plug-ins inside the package (through the same contracts as yours)
ALIASES: dict[str, dict[str, str]] = {
    "model": {"transformer": "sampa_ray.models.transformer:build"},
    "dataset": {"modadd": "sampa_ray.data.modadd:load"},
    "loss": {},
    "algo": {},
}
_BUILTIN = {"model": BUILTIN_MODELS, "dataset": BUILTIN_DATASETS, "loss": (), "algo": ()}
_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")

#: objects by import path, registered in this process (resolved ones and ``fit``'s callables)
_OBJECTS: dict[str, Any] = {}


def is_plugin(kind: str, name: str | None) -> bool:
    """Whether ``name`` (a config value of ``kind``) is served by a plug-in, not by the
    built-in image models and in-memory datasets."""
    return name is not None and name not in _BUILTIN[kind]


def check_name(kind: str, name: str) -> str:
    """``name`` if it is a built-in of ``kind`` or has an import path's form; else ValueError
    (a config field's one-line error)."""
    if name in _BUILTIN[kind] or name in ALIASES[kind] or _SPEC.match(name):
        return name
    known = ", ".join((*_BUILTIN[kind], *ALIASES[kind]))
    builtin = f"built-in: {known}; " if known else ""
    raise ValueError(f"unknown {kind} {name!r} ({builtin}or a plug-in as "
                     f"package.module:function)")


#: the run folder's file that holds its plug-ins by value (:func:`save_parts`)
PARTS_FILE = "parts.pkl"


def by_value(objs: Iterable[Any], pickler: Any = cloudpickle) -> None:
    """Have ``pickler`` (cloudpickle, or Ray's copy of it) pickle the user's modules behind
    ``objs`` by value, so the objects load where those modules cannot be imported."""
    for obj in objs:
        obj = obj.func if isinstance(obj, functools.partial) else obj
        name = getattr(obj, "__module__", None) or "__main__"
        module = sys.modules.get(name)
        if module is not None and name != "__main__" and not name.startswith("sampa_ray."):
            pickler.register_pickle_by_value(module)


def _pickled(obj: Any) -> bytes:
    by_value([obj])
    try:
        return cloudpickle.dumps(obj)
    except Exception as err:
        raise UserError(f"plug-in: {obj!r} cannot be pickled ({type(err).__name__}: {err}); "
                        "it must travel to Ray's processes and into the run folder") from None


def spec_of(obj: Any) -> str:
    """The name of ``obj`` in a config: its import path (``module:qualname``) where it has one;
    else (a lambda, a closure, a partial, a callable object) what it is, made a valid name,
    with a digest of its pickled value, so two different ones never share a name."""
    base = obj.func if isinstance(obj, functools.partial) else obj
    module = getattr(base, "__module__", None) or "__main__"
    qual = getattr(base, "__qualname__", None) or getattr(base, "__name__", None) \
        or type(base).__qualname__
    spec = f"{module}:{qual}"
    if base is obj and hasattr(obj, "__qualname__") and _SPEC.match(spec):
        return spec
    made = re.sub(r"[^\w.]", "", qual).strip(".") or "part"
    made = made if made[0].isalpha() or made[0] == "_" else f"_{made}"
    kind = "_partial" if base is not obj else ""
    digest = hashlib.blake2b(_pickled(obj), digest_size=4).hexdigest()
    return f"{module}:{made}{kind}_{digest}"


def register(obj: Any) -> str:
    """Register a callable under its import path and return that path (the config value)."""
    if not callable(obj):
        raise UserError(f"plug-in: {obj!r} is not callable")
    spec = spec_of(obj)
    _OBJECTS[spec] = obj
    return spec


def registered() -> dict[str, Any]:
    """The objects registered in this process, by import path (what travels to Ray by value)."""
    return dict(_OBJECTS)


def install(objects: dict[str, Any]) -> None:
    """Register objects shipped from the driver (a coordinator's or worker's start)."""
    _OBJECTS.update(objects)


def shipped() -> dict[str, dict[str, Any]]:
    """What a Ray coordinator and its workers need from this process: the algorithms registered
    beyond the built-ins, and the plug-in objects, by name."""
    from . import algorithms, datapaths  # imports torch: only where a run starts

    return {"algorithms": {n: c for n, c in algorithms.registered().items()
                           if n not in algorithms.shipped()},
            "paths": datapaths.registered(), "objects": registered()}


def install_shipped(bundle: dict[str, dict[str, Any]] | None) -> None:
    """Register, in a coordinator or a worker, what :func:`shipped` gave the driver."""
    if not bundle:
        return
    from . import algorithms, datapaths

    for name, cls in bundle.get("algorithms", {}).items():
        algorithms.register(name, cls)
    datapaths.install(bundle.get("paths", {}))
    install(bundle.get("objects", {}))


def resolve(kind: str, name: str) -> Any:
    """The object behind config value ``name`` of ``kind`` (a plug-in, or a package alias):
    registered here, else imported. Any failure is a one-line UserError naming the field."""
    spec = ALIASES[kind].get(name, name)
    if spec in _OBJECTS:
        return _OBJECTS[spec]
    module_name, _, attr = spec.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path:  # a command run in a project folder finds its modules
        sys.path.insert(0, cwd)
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            raise UserError(f"{kind}: no module named {err.name!r} (from {name}; is its "
                            f"folder the current directory or on PYTHONPATH?)") from None
        raise UserError(f"{kind}: importing {module_name} failed: No module named "
                        f"{err.name!r}") from None
    except Exception as err:  # the user's module raised while importing
        raise UserError(f"{kind}: importing {module_name} failed: "
                        f"{type(err).__name__}: {err}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UserError(f"{kind}: {module_name} has no {attr!r}") from None
    if not callable(obj):
        raise UserError(f"{kind}: {name} is a {type(obj).__name__}, not a function or class")
    _OBJECTS[spec] = obj
    return obj


def parts_of(fields: Any) -> dict[str, str]:
    """The run's plug-ins (not the built-ins, nor the package's own aliases): their config
    name by kind."""
    parts = {}
    for kind, name in (("model", fields.model), ("dataset", fields.dataset),
                       ("loss", fields.loss), ("algo", fields.algo)):
        if name and ":" in name and name not in ALIASES[kind]:  # an import path's form
            parts[kind] = name
    return parts


def save_parts(cfg: Any, folder: Path) -> None:
    """Write the run's plug-ins by value into ``folder/parts.pkl`` (written whole, then
    renamed), so the trained model can be rebuilt where their modules do not exist: a
    script's functions, run as ``__main__``, exist only while it runs."""
    parts = parts_of(cfg)
    if not parts:
        return
    objs = {name: resolve(kind, name) for kind, name in parts.items()}
    by_value(objs.values())
    try:
        data = cloudpickle.dumps(objs)
    except Exception as err:
        raise UserError(f"plug-in: the run's parts cannot be pickled into {folder} "
                        f"({type(err).__name__}: {err})") from None
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{PARTS_FILE}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, folder / PARTS_FILE)


def load_parts(folder: Path) -> None:
    """Register the plug-ins a run folder holds (:func:`save_parts`), ahead of any of the same
    name: the model is rebuilt from the code it was trained with. Unpickling runs code: load
    only run folders you trust, as with any pickle."""
    path = folder / PARTS_FILE
    if not path.is_file():
        return
    try:
        objs = cloudpickle.loads(path.read_bytes())
    except Exception as err:
        raise UserError(f"load: cannot read {path}: {type(err).__name__}: {err}") from None
    install(objs)


__all__ = ["ALIASES", "BUILTIN_DATASETS", "BUILTIN_MODELS", "PARTS_FILE", "by_value",
           "check_name", "install", "install_shipped", "is_plugin", "load_parts", "parts_of",
           "register", "registered", "resolve", "save_parts", "shipped", "spec_of"]
