"""What a sweep's runs say, from their ``result.json`` files alone: per algorithm and grid
setting the final test accuracy's mean, standard deviation and 95% confidence interval over the
seeds (Student's t), the paired differences against SAM and against SGD on the same seeds (mean
and 95% CI), the wall-clock per run and the sequential gradients per update; a run that
collapsed (final test accuracy at chance, at most ``1/num_classes + 0.05``, or a run that ended
without a result: non-finite losses and the like) is counted and flagged, never averaged in.

Writes ``accuracy.md``, ``accuracy.csv`` and ``figure.png``. Nothing here imports Ray or torch.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: two-sided 95% quantiles of Student's t, t_{0.975, df}, for df = 1..30
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
       2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
       2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
#: above chance by at most this much, a run's final test accuracy counts as collapsed
COLLAPSE_MARGIN = 0.05


def t95(df: int) -> float:
    """t_{0.975, df}: the table up to 30 degrees of freedom; beyond, 1.96 + 2.4/df (within
    0.003 of the exact value from df 31 on)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {df}")
    return T95[df - 1] if df <= len(T95) else 1.96 + 2.4 / df


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation (n - 1) and the 95% t-interval of ``n`` values (NaN
    where ``n`` is too small to say)."""

    n: int
    mean: float
    sd: float
    half: float  # half-width of the 95% interval

    @property
    def lo(self) -> float:
        return self.mean - self.half

    @property
    def hi(self) -> float:
        return self.mean + self.half


def summarize(values: Iterable[float]) -> Summary:
    """:class:`Summary` of ``values``."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan)
    mean = sum(xs) / n
    if n == 1:
        return Summary(1, mean, math.nan, math.nan)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return Summary(n, mean, sd, t95(n - 1) * sd / math.sqrt(n))


def paired(a: Mapping[int, float], b: Mapping[int, float]) -> Summary:
    """The paired differences ``a[s] - b[s]`` over the seeds both have."""
    return summarize(a[s] - b[s] for s in sorted(set(a) & set(b)))


@dataclass
class Run:
    """One trial as the study reads it: its algorithm, grid setting, seed and ``result.json``
    (None where the run ended without one), or the line it failed with."""

    algo: str
    setting: str
    seed: int
    result: Mapping[str, Any] | None = None
    error: str | None = None


def chance(result: Mapping[str, Any]) -> float:
    """Chance accuracy of a run: 1 / its number of classes."""
    k = result.get("num_classes") or 0
    return 1.0 / k if k else 0.0


def collapsed(run: Run) -> str | None:
    """Why the run counts as collapsed (``at chance``, ``no result: ...``), or None."""
    r = run.result
    if r is None:
        return f"no result: {run.error or 'failed'}"
    acc = r.get("final_test_accuracy")
    if acc is None or not math.isfinite(float(acc)):
        return "no test accuracy"
    if float(acc) <= chance(r) + COLLAPSE_MARGIN:
        return f"at chance ({float(acc):.3f})"
    return None


@dataclass
class Row:
    """One algorithm at one grid setting, over its seeds."""

    algo: str
    setting: str
    seeds: int
    collapsed: dict[int, str] = field(default_factory=dict)
    accuracy: dict[int, float] = field(default_factory=dict)  # seed -> accuracy, good runs
    wall: Summary = field(default_factory=lambda: summarize([]))
    sequential: float = math.nan
    acc: Summary = field(default_factory=lambda: summarize([]))
    vs_sam: Summary | None = None
    vs_sgd: Summary | None = None


def rows_of(runs: Sequence[Run]) -> list[Row]:
    """The rows of the study, in the order the runs' algorithms and settings first appear."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.algo, run.setting), []).append(run)
    rows = []
    for (algo, setting), group in groups.items():
        row = Row(algo, setting, len(group))
        walls, seq = [], []
        for run in group:
            why = collapsed(run)
            if why:
                row.collapsed[run.seed] = why
            else:
                assert run.result is not None
                row.accuracy[run.seed] = float(run.result["final_test_accuracy"])
            if run.result is not None:
                walls.append(float(run.result.get("wall_time_s") or math.nan))
                s = run.result.get("sequential_gradients_per_update")
                if s is not None:
                    seq.append(float(s))
        row.acc = summarize(row.accuracy.values())
        row.wall = summarize(w for w in walls if math.isfinite(w))
        row.sequential = sum(seq) / len(seq) if seq else math.nan
        rows.append(row)
    by_key = {(r.algo, r.setting): r for r in rows}
    for row in rows:
        for ref, attr in (("sam", "vs_sam"), ("sgd", "vs_sgd")):
            other = by_key.get((ref, row.setting))
            if other is not None and other is not row:
                setattr(row, attr, paired(row.accuracy, other.accuracy))
    return rows


def _pct(x: float, digits: int = 2) -> str:
    return "–" if not math.isfinite(x) else f"{100 * x:.{digits}f}"


def _interval(s: Summary | None, signed: bool = False) -> str:
    if s is None or s.n == 0:
        return "–"
    sign = "+" if signed else ""
    mean = f"{100 * s.mean:{sign}.2f}"
    if s.n < 2:
        return f"{mean} (n=1)"
    return f"{mean} [{100 * s.lo:{sign}.2f}, {100 * s.hi:{sign}.2f}]"


def markdown(rows: Sequence[Row], header: str = "") -> str:
    """``accuracy.md``: one table row per algorithm and setting, accuracies in percent."""
    has_setting = any(r.setting for r in rows)
    cols = ["algorithm", *(["setting"] if has_setting else []), "seeds",
            "test accuracy % (mean ± sd)", "95% CI", "− SAM (paired, 95% CI)",
            "− SGD (paired, 95% CI)", "wall s / run", "seq. grads / update", "collapsed"]
    lines = [header.rstrip() + "\n" if header else "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        ci = (f"[{_pct(r.acc.lo)}, {_pct(r.acc.hi)}]" if r.acc.n >= 2 else "–")
        acc = (f"{_pct(r.acc.mean)} ± {_pct(r.acc.sd)}" if r.acc.n >= 2 else _pct(r.acc.mean))
        flag = "none" if not r.collapsed else (
            f"**{len(r.collapsed)} of {r.seeds}, not averaged** (" +
            "; ".join(f"seed {s}: {w}" for s, w in sorted(r.collapsed.items())) + ")")
        wall = "–" if r.wall.n == 0 else f"{r.wall.mean:.1f} ± {r.wall.sd:.1f}" \
            if r.wall.n >= 2 else f"{r.wall.mean:.1f}"
        cells = [r.algo, *([r.setting or "–"] if has_setting else []), str(r.seeds), acc, ci,
                 _interval(r.vs_sam, True), _interval(r.vs_sgd, True), wall,
                 "–" if not math.isfinite(r.sequential) else f"{r.sequential:.3f}", flag]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines).lstrip("\n") + "\n"


CSV_COLUMNS = ("algo", "setting", "seeds", "good_runs", "collapsed", "acc_mean", "acc_sd",
               "acc_ci_lo", "acc_ci_hi", "vs_sam_n", "vs_sam_mean", "vs_sam_ci_lo",
               "vs_sam_ci_hi", "vs_sgd_n", "vs_sgd_mean", "vs_sgd_ci_lo", "vs_sgd_ci_hi",
               "wall_s_mean", "wall_s_sd", "sequential_gradients_per_update")


def csv_rows(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """``accuracy.csv``'s rows: fractions (not percent), NaN left empty."""
    def num(x: float) -> Any:
        return "" if not math.isfinite(x) else round(x, 6)

    out = []
    for r in rows:
        d: dict[str, Any] = {"algo": r.algo, "setting": r.setting, "seeds": r.seeds,
                             "good_runs": r.acc.n, "collapsed": len(r.collapsed),
                             "acc_mean": num(r.acc.mean), "acc_sd": num(r.acc.sd),
                             "acc_ci_lo": num(r.acc.lo), "acc_ci_hi": num(r.acc.hi)}
        for name, s in (("vs_sam", r.vs_sam), ("vs_sgd", r.vs_sgd)):
            d[f"{name}_n"] = s.n if s else ""
            d[f"{name}_mean"] = num(s.mean) if s else ""
            d[f"{name}_ci_lo"] = num(s.lo) if s else ""
            d[f"{name}_ci_hi"] = num(s.hi) if s else ""
        d.update(wall_s_mean=num(r.wall.mean), wall_s_sd=num(r.wall.sd),
                 sequential_gradients_per_update=num(r.sequential))
        out.append(d)
    return out


def plot(path: Path, rows: Sequence[Row]) -> None:
    """``figure.png``: final test accuracy (mean, 95% CI bars) against sequential gradients
    per update (left) and against wall-clock per run (right, ± sd), one point per algorithm and
    setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..outdir import write_atomic

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for r in rows:
        if r.acc.n == 0:
            continue
        label = r.algo + (f" {r.setting}" if r.setting else "")
        yerr = 100 * r.acc.half if math.isfinite(r.acc.half) else None
        left.errorbar(r.sequential, 100 * r.acc.mean, yerr=yerr, fmt="o", capsize=4,
                      label=label)
        xerr = r.wall.sd if math.isfinite(r.wall.sd) else None
        right.errorbar(r.wall.mean, 100 * r.acc.mean, yerr=yerr, xerr=xerr, fmt="o",
                       capsize=4, label=label)
    left.set_xlabel("sequential gradients per update")
    right.set_xlabel("wall-clock per run (s)")
    for ax in (left, right):
        ax.set_ylabel("final test accuracy % (95% CI)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    write_atomic(path, png.getvalue())


def write_study(out: Path, runs: Sequence[Run], header: str = "") -> str:
    """Write ``accuracy.md``, ``accuracy.csv`` and ``figure.png`` into ``out``; returns the
    markdown."""
    from ..outdir import write_atomic

    rows = rows_of(runs)
    text = markdown(rows, header)
    write_atomic(out / "accuracy.md", text.encode())
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(csv_rows(rows))
    write_atomic(out / "accuracy.csv", buf.getvalue().encode())
    plot(out / "figure.png", rows)
    return text


__all__ = ["COLLAPSE_MARGIN", "CSV_COLUMNS", "T95", "Row", "Run", "Summary", "collapsed",
           "csv_rows", "markdown", "paired", "plot", "rows_of", "summarize", "t95",
           "write_study"]
