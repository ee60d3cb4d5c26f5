"""What the study measures: its settings (:class:`BenchSpec`, one :class:`LinkSetting` per
emulated link) and the checks that turn plain values into them.

Every bad value is a :class:`~sampa_ray.errors.UserError` whose one line names the flag it came
from (``--latency-ms: ...``), so the CLI, which owns argparse, only passes the values through.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import datapaths
from ..errors import UserError
from ..outdir import stamped

CPU_MODELS = ("resnet20", "resnet56")
GPU_MODELS = ("resnet20", "resnet56", "wrn28_2", "wrn28_10")
#: the transports and data paths (the one list of them: ``sampa_ray.datapaths``)
TRANSPORTS = datapaths.transports()
DATA_PATHS = datapaths.names()
WIRE_DTYPES = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
#: ``--baseline``: none, or ddp (SGD and SAM data-parallel over all 2k workers, beside SAMPa)
BASELINES = ("none", "ddp")
#: the most workers per role a configuration accepts (``TrainConfig.workers_per_role``)
MAX_WORKERS_PER_ROLE = 64


@dataclass(frozen=True)
class LinkSetting:
    """One emulated link: latency per message and a bandwidth cap (None: uncapped)."""

    latency_ms: float
    gbit_s: float | None

    def delay_ms(self, nbytes: int) -> float:
        """What one message of ``nbytes`` waits on this link, ms (the emulated link's own
        arithmetic: ``sampa_ray.transport.link``)."""
        from ..transport.link import link_delay_ms  # the transport package loads torch

        return link_delay_ms(nbytes, self.latency_ms, self.gbit_s)

    def tag(self) -> str:
        """The link's part of a run's folder name, e.g. ``lat5ms-bw0.1``."""
        return f"lat{self.latency_ms:g}ms-bw{'none' if self.gbit_s is None else f'{self.gbit_s:g}'}"


@dataclass
class BenchSpec:
    """The validated settings of one study (the flags of ``sampa-ray bench``)."""

    models: list[str] | None  # None: the preset for the device (decided once Ray is up)
    transports: list[str]
    data_paths: list[str]
    latencies_ms: list[float]
    bandwidths: list[float | None]
    repeats: int
    steps: int
    batch_size: int
    threads: int | None
    device: str
    out: Path
    overwrite: bool = False
    wire_dtype: str = "fp32"
    #: also measure per-round compute and overhead (see ``report.round_costs``)
    round_costs: bool = False
    #: k of each pass over the grid (2k workers each; its own actors): role groups of k
    workers_per_role: list[int] = field(default_factory=lambda: [1])
    #: ``ddp``: SGD and SAM also run data-parallel over all 2k workers (sgd-ddp, sam-ddp)
    baseline: str = "none"

    def links(self) -> list[LinkSetting]:
        """Every latency x bandwidth pair, latency outermost."""
        return [LinkSetting(lat, bw) for lat in self.latencies_ms for bw in self.bandwidths]

    def combos(self, k: int = 1) -> list[tuple[str, str]]:
        """(transport, data path) pairs that exist: gRPC carries points only, and serves one
        worker per role, so role groups (``k`` > 1) run on the ray transport alone."""
        return datapaths.combos(self.transports, self.data_paths, grouped=k > 1)

    def algos(self, transport: str) -> list[str]:
        """The algorithms of one configuration: SGD, SAM and SAMPa, and with ``--baseline ddp``
        sgd-ddp and sam-ddp where they can run (data-parallel groups need the ray transport)."""
        from ..algorithms import BUILTIN, baselines

        ddp = list(baselines()) if self.baseline == "ddp" and transport == "ray" else []
        return [*BUILTIN, *ddp]


def unique(values: Iterable[Any]) -> list[Any]:
    """``values`` without repeats, in first-seen order."""
    return list(dict.fromkeys(values))


def choice(flag: str, values: Sequence[str], allowed: Sequence[str]) -> list[str]:
    """``values`` (repeats dropped) if each is one of ``allowed``, else a UserError naming
    ``--flag``."""
    for v in values:
        if v not in allowed:
            raise UserError(f"--{flag}: unknown {v!r} (choose from {', '.join(allowed)})")
    return unique(values)


def _number(flag: str, text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise UserError(f"--{flag}: not a number: {text!r}") from None
    if not math.isfinite(v):
        raise UserError(f"--{flag}: must be finite, got {text!r}")
    return v


def parse_workers_per_role(values: Sequence[str | int]) -> list[int]:
    """``--workers-per-role`` values: whole numbers from 1 to 64 (the config's bound), repeats
    dropped, ascending (the scaling table and plot read from few devices to many)."""
    out = []
    for text in values:
        try:
            v = int(str(text).strip())
        except ValueError:
            raise UserError(f"--workers-per-role: not a whole number: {text!r}") from None
        if not 1 <= v <= MAX_WORKERS_PER_ROLE:
            raise UserError(f"--workers-per-role: must be from 1 to {MAX_WORKERS_PER_ROLE}, "
                            f"got {text!r}")
        out.append(v)
    return sorted(unique(out))


def parse_latencies(values: Sequence[str]) -> list[float]:
    """``--latency-ms`` values: numbers >= 0 (milliseconds per message), sorted ascending."""
    out = []
    for text in values:
        v = _number("latency-ms", text)
        if v < 0:
            raise UserError(f"--latency-ms: must be >= 0, got {text!r}")
        out.append(v)
    return sorted(unique(out))


def parse_bandwidths(values: Sequence[str]) -> list[float | None]:
    """``--bandwidth-gbit`` values: ``none`` (uncapped) or numbers > 0 (Gbit/s); uncapped
    first, then from the fastest to the slowest link."""
    out: list[float] = []
    uncapped = False
    for text in values:
        if text.strip().lower() == "none":
            uncapped = True
            continue
        v = _number("bandwidth-gbit", text)
        if v <= 0:
            raise UserError(f"--bandwidth-gbit: must be > 0 or none (uncapped), got {text!r}")
        out.append(v)
    caps: list[float | None] = sorted(unique(out), reverse=True)
    return [None, *caps] if uncapped else caps


def make_spec(*, models: Sequence[str] | None, transports: Sequence[str],
              data_paths: Sequence[str], latency_ms: Sequence[str],
              bandwidth_gbit: Sequence[str], repeats: int, steps: int, batch_size: int,
              threads: int | None, device: str, out: str | Path | None, overwrite: bool = False,
              wire_dtype: str = "fp32", round_costs: bool = False,
              workers_per_role: Sequence[str | int] = ("1",),
              baseline: str = "none") -> BenchSpec:
    """Validate the values (as the flags give them: latencies, bandwidths and workers per role
    as text) into a :class:`BenchSpec`; a bad value is a UserError naming its flag. Without
    ``out``: the study goes to ``runs/bench-<timestamp>``."""
    from ..models import MODEL_NAMES

    spec = BenchSpec(
        models=choice("models", models, MODEL_NAMES) if models else None,
        transports=choice("transports", transports, TRANSPORTS),
        data_paths=choice("data-paths", data_paths, DATA_PATHS),
        latencies_ms=parse_latencies(latency_ms),
        bandwidths=parse_bandwidths(bandwidth_gbit),
        repeats=repeats, steps=steps, batch_size=batch_size, threads=threads, device=device,
        out=Path(out) if out else stamped("bench"),
        overwrite=bool(overwrite),
        wire_dtype=choice("wire-dtype", [wire_dtype], WIRE_DTYPES)[0],
        round_costs=round_costs,
        workers_per_role=parse_workers_per_role(workers_per_role),
        baseline=choice("baseline", [baseline], BASELINES)[0])
    if spec.repeats < 1:
        raise UserError(f"--repeats: must be at least 1, got {spec.repeats}")
    if spec.steps < 2:
        raise UserError(f"--steps: must be at least 2 (the first update is not timed), "
                        f"got {spec.steps}")
    if spec.batch_size < 1:
        raise UserError(f"--batch-size: must be at least 1, got {spec.batch_size}")
    if spec.threads is not None and spec.threads < 1:
        raise UserError(f"--threads: must be at least 1, got {spec.threads}")
    if spec.device not in DEVICES:
        raise UserError(f"--device: unknown {spec.device!r} (choose from {', '.join(DEVICES)})")
    if not spec.combos():
        raise UserError("--data-paths: the grpc transport carries points only; with "
                        "--transports grpc include points")
    grouped = [k for k in spec.workers_per_role if k > 1]
    if grouped and "ray" not in spec.transports:
        raise UserError(f"--workers-per-role: role groups of {grouped[0]} workers run on the "
                        "ray transport only (gRPC serves one worker per role); add ray to "
                        "--transports")
    if spec.baseline == "ddp" and "ray" not in spec.transports:
        raise UserError("--baseline: ddp runs its data-parallel groups on the ray transport "
                        "only; add ray to --transports")
    # each worker of the largest group needs at least one sample of the global batch
    need = max(spec.workers_per_role) * (2 if spec.baseline == "ddp" else 1)
    if spec.batch_size < need:
        raise UserError(f"--batch-size: {spec.batch_size} cannot be shared by {need} workers "
                        f"(--workers-per-role {max(spec.workers_per_role)}"
                        f"{', --baseline ddp' if spec.baseline == 'ddp' else ''}); each needs "
                        "at least one sample")
    return spec
