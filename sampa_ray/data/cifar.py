"""Read CIFAR-10 / CIFAR-100 from the official python-pickle files in a local folder.

Nothing is downloaded: the user fetches and extracts the archive on a connected machine and
points ``data_dir`` at it. The files are Python pickles, and a plain ``pickle.load`` runs
whatever callable a pickle names, so a crafted file in ``data_dir`` could run code. They are read
with :class:`CifarUnpickler` instead, which admits only what the official files are made of
(dicts, lists, bytes, numbers, and numpy arrays and dtypes) and refuses any other global before
anything is called.
"""

from __future__ import annotations

import codecs
import importlib
import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from sampa_ray.errors import UserError

_PIXELS = 3 * 32 * 32


@dataclass(frozen=True)
class CifarSpec:
    """Layout and normalization constants of one CIFAR variant."""

    name: str
    folder: str  # folder name inside the official archive
    url: str
    train_files: tuple[str, ...]
    test_file: str
    label_key: bytes
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


CIFAR10 = CifarSpec(
    name="cifar10",
    folder="cifar-10-batches-py",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_file="test_batch",
    label_key=b"labels",
    num_classes=10,
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
)

CIFAR100 = CifarSpec(
    name="cifar100",
    folder="cifar-100-python",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    train_files=("train",),
    test_file="test",
    label_key=b"fine_labels",
    num_classes=100,
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
)

CIFAR_SPECS: dict[str, CifarSpec] = {CIFAR10.name: CIFAR10, CIFAR100.name: CIFAR100}


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle named a callable that CIFAR files never hold (nothing was called)."""


def _numpy_core(sub: str) -> ModuleType:
    """numpy's ``_core.<sub>`` (numpy 2) or ``core.<sub>`` (numpy 1)."""
    try:
        return importlib.import_module(f"numpy._core.{sub}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{sub}")


class CifarUnpickler(pickle.Unpickler):
    """Unpickles CIFAR files and nothing else: the only globals admitted are the ones numpy
    arrays are rebuilt from (written by numpy 1 as ``numpy.core``, by numpy 2 as ``numpy._core``,
    protocol 2 to 5) and ``_codecs.encode`` (bytes in a protocol-2 pickle written by Python 3).
    None of them runs user code; any other name is refused before it is looked up."""

    def find_class(self, module: str, name: str) -> Any:
        for core, names in (("multiarray", ("_reconstruct", "scalar")),
                            ("numeric", ("_frombuffer",))):
            if module in (f"numpy.core.{core}", f"numpy._core.{core}") and name in names:
                return getattr(_numpy_core(core), name)
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if (module, name) == ("_codecs", "encode"):
            return codecs.encode
        raise RefusedGlobal(f"it names {module}.{name}, which no CIFAR file holds; refused "
                            "without running it")


def load_pickle(data: bytes) -> Any:
    """Unpickle the bytes of one CIFAR file with :class:`CifarUnpickler`."""
    return CifarUnpickler(io.BytesIO(data), encoding="bytes").load()


def _hint(spec: CifarSpec) -> str:
    return f"(download {spec.url} on a connected machine and extract it there)"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def resolve_folder(spec: CifarSpec, data_dir: str | Path | None) -> Path:
    """The folder holding the pickle files: ``data_dir`` itself or ``data_dir/<archive folder>``."""
    if data_dir is None or str(data_dir).strip() == "":
        raise UserError(f"{spec.name}: no data_dir given {_hint(spec)}")
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise UserError(f"{spec.name}: data folder {root} does not exist {_hint(spec)}")
    if not root.is_dir():
        raise UserError(f"{spec.name}: {root} is a file, not a folder {_hint(spec)}")
    first = spec.train_files[0]
    if (root / first).exists():
        return root
    nested = root / spec.folder
    if nested.is_dir():
        return nested
    raise UserError(f"{spec.name}: no {first} or {spec.folder}/ in {root} {_hint(spec)}")


def _read_file(spec: CifarSpec, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickle file -> (uint8 images (n, 3072), int64 labels (n,))."""
    if not path.exists():
        raise UserError(f"{spec.name}: no {path.name} in {path.parent} {_hint(spec)}")

    def bad(reason: str) -> UserError:
        return UserError(f"{spec.name}: {path} is malformed ({_one_line(reason)}) {_hint(spec)}")

    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(
            f"{spec.name}: cannot read {path} ({_one_line(e.strerror or e)}) {_hint(spec)}"
        ) from e
    try:
        obj = load_pickle(raw)  # admits numpy arrays and plain data only (see module doc)
    except RefusedGlobal as e:
        raise bad(str(e)) from None
    except Exception as e:  # any unpickling failure means a bad file
        raise bad(f"not a CIFAR python pickle: {type(e).__name__}") from e
    if not isinstance(obj, dict):
        raise bad(f"expected a dict, got {type(obj).__name__}")
    for key in (b"data", spec.label_key):
        if key not in obj:
            raise bad(f"missing key {key.decode()!r}")
    try:
        data = np.asarray(obj[b"data"])
        labels = np.asarray(obj[spec.label_key])
    except Exception as e:
        raise bad(f"unreadable arrays: {type(e).__name__}") from e
    if data.ndim != 2 or data.shape[1] != _PIXELS or data.shape[0] == 0:
        raise bad(f"data has shape {tuple(data.shape)}, expected (N, {_PIXELS})")
    if data.dtype != np.uint8:
        if not np.issubdtype(data.dtype, np.integer) or data.min() < 0 or data.max() > 255:
            raise bad(f"data has dtype {data.dtype}, expected uint8 pixels")
        data = data.astype(np.uint8)
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise bad(f"{labels.shape} labels for {data.shape[0]} images")
    if not np.issubdtype(labels.dtype, np.integer):
        raise bad(f"labels have dtype {labels.dtype}, expected integers")
    if labels.min() < 0 or labels.max() >= spec.num_classes:
        raise bad(f"labels outside [0, {spec.num_classes})")
    return data, labels.astype(np.int64)


def _to_tensor(spec: CifarSpec, data: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(data).reshape(-1, 3, 32, 32).to(torch.float32).div_(255.0)
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def load_cifar(
    name: str, data_dir: str | Path | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Load ``cifar10`` or ``cifar100`` -> (x_train, y_train, x_test, y_test, num_classes).

    Images are float32 (N, 3, 32, 32) normalized with the standard per-channel mean/std.
    """
    spec = CIFAR_SPECS[name]
    folder = resolve_folder(spec, data_dir)
    # Check every file is present before reading any, so a missing one is reported quickly.
    for fname in (*spec.train_files, spec.test_file):
        if not (folder / fname).exists():
            raise UserError(f"{spec.name}: no {fname} in {folder} {_hint(spec)}")
    parts = [_read_file(spec, folder / fname) for fname in spec.train_files]
    train_data = np.concatenate([p[0] for p in parts])
    train_labels = np.concatenate([p[1] for p in parts])
    test_data, test_labels = _read_file(spec, folder / spec.test_file)
    return (
        _to_tensor(spec, train_data),
        torch.from_numpy(train_labels),
        _to_tensor(spec, test_data),
        torch.from_numpy(test_labels),
        spec.num_classes,
    )
