"""``sampa-ray bench``: a tiny real study on an embedded Ray instance (CSV, markdown, plots, an
emulated latency that shows up where it should), a tiny one over k = 1, 2 workers per role with
the data-parallel baseline (devices per algorithm, the scaling table's ratios, scaling.png), the
break-even interpolation and the round split on known numbers, and bad flags as one line with
exit code 2."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from sampa_ray.cli import build_parser, main
from sampa_ray.errors import UserError
from sampa_ray.study.breakeven import BreakEven, break_even
from sampa_ray.study.report import (
    ALGOS,
    COLUMNS,
    METRICS,
    RUN_COLUMNS,
    Stat,
    aggregate,
    sampa_breakdown,
)
from sampa_ray.study.spec import parse_bandwidths, parse_workers_per_role

PNG = b"\x89PNG\r\n\x1a\n"
COMBOS = {("ray", "points"), ("ray", "replicated"), ("grpc", "points")}
TINY = ["--models", "cnn", "--transports", "ray", "grpc", "--data-paths", "points",
        "replicated", "--latency-ms", "0", "50", "--bandwidth-gbit", "none", "--repeats", "1",
        "--steps", "4", "--batch-size", "8", "--threads", "1", "--device", "cpu",
        "--wire-dtype", "bf16"]


#: k = 1 and 2 (2 and 4 workers on the 2 CPUs: one torch thread each) with the data-parallel
#: baseline: a small model, one data path, one link, three updates
SCALED = ["--models", "mlp", "--transports", "ray", "--data-paths", "replicated",
          "--latency-ms", "0", "--bandwidth-gbit", "none", "--repeats", "1", "--steps", "3",
          "--batch-size", "8", "--threads", "1", "--device", "cpu",
          "--workers-per-role", "2", "1", "--baseline", "ddp"]


def run_cli(*argv: str) -> int:
    """``sampa-ray bench ARGV`` through the CLI's main."""
    return main(["bench", *argv])


def _study(out: Path, argv: list[str]) -> tuple[Path, str]:
    """Run ``sampa-ray bench ARGV --out OUT``; returns the folder and what it printed."""
    import contextlib
    import io

    args = build_parser().parse_args(["bench", *argv, "--out", str(out)])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert args.func(args) == 0
    return out, buf.getvalue()


@pytest.fixture(scope="module")
def study(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return _study(tmp_path_factory.mktemp("bench") / "study", TINY)


@pytest.fixture(scope="module")
def scaled(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return _study(tmp_path_factory.mktemp("bench") / "scaled", SCALED)


def _rows(out: Path, name: str = "bench.csv") -> list[dict[str, str]]:
    with open(out / name, newline="") as f:
        return list(csv.DictReader(f))


def _row(rows: list[dict[str, str]], transport: str, path: str, lat: float) -> dict[str, str]:
    (r,) = [r for r in rows if (r["transport"], r["data_path"]) == (transport, path)
            and float(r["latency_ms"]) == lat]
    return r


def test_csv_rows_columns_and_ratios(study: tuple[Path, str]) -> None:
    out, _ = study
    rows = _rows(out)
    assert list(rows[0]) == list(COLUMNS)
    assert len(rows) == len(COMBOS) * 2  # x 2 latencies x 1 repeat; grpc/replicated skipped
    assert {(r["transport"], r["data_path"]) for r in rows} == COMBOS
    for r in rows:
        assert r["model"] == "cnn" and r["bandwidth_gbit"] == "none" and r["repeat"] == "1"
        # a bf16 wire: each gradient travelled as 2 bytes per parameter
        assert r["wire_dtype"] == "bf16"
        assert float(r["grad_mb"]) == pytest.approx(2 * int(r["params"]) / 1e6, rel=1e-12)
        sgd, sam, sampa = (float(r[k]) for k in ("sgd_ms", "sam_ms", "sampa_ms"))
        assert min(sgd, sam, sampa, float(r["sampa_compute_ms"])) > 0
        assert float(r["sam_over_sampa"]) == pytest.approx(sam / sampa, rel=1e-12)
        assert float(r["sampa_over_sgd"]) == pytest.approx(sampa / sgd, rel=1e-12)
        assert 0 <= float(r["sampa_transfer_share"]) <= 1
    # every run's result.json kept; the runs' own folders (final.pt, checkpoints) are gone
    kept = sorted((out / "runs").glob("*/*.json"))
    assert len(kept) == len(rows) * 3
    assert not (out / "work").exists()


def test_latency_lands_in_sampa_transfer(study: tuple[Path, str]) -> None:
    """50 ms per message: SAMPa's transfer holds at least the emulated delay (points: a point
    down and a gradient up per worker; replicated: the peer's gradient in; the workers sleep
    it), the delay is not counted as compute or wait, and the transfer share of the step
    grows."""
    rows = _rows(study[0])
    for transport, path in COMBOS:
        fast, slow = _row(rows, transport, path, 0.0), _row(rows, transport, path, 50.0)
        shown = {k: (fast[k], slow[k]) for k in ("sampa_ms", "sampa_round_ms",
                                                  "sampa_transfer_ms", "sampa_transfer_share")}
        messages = 2 if path == "points" else 1
        assert float(slow["link_ms_per_message"]) == 50.0
        assert float(slow["sampa_transfer_ms"]) >= 0.95 * 50 * messages, shown
        assert float(slow["sampa_compute_ms"]) + float(slow["sampa_wait_ms"]) < 50, shown
        assert float(slow["sampa_transfer_share"]) > float(fast["sampa_transfer_share"]), shown
    # replicated: SGD and SAM use one worker, nothing crosses the link; SAMPa waits for the
    # peer's gradient every step, so at 50 ms SAMPa loses to SAM
    rep = _row(rows, "ray", "replicated", 50.0)
    assert float(rep["sam_over_sampa"]) < 1


def test_markdown_plots_and_break_even(study: tuple[Path, str]) -> None:
    out, printed = study
    md = (out / "bench.md").read_text()
    assert "| model | transport | data path | latency (ms) |" in md
    assert md.count("| cnn | ") >= len(COMBOS) * 2
    assert md.split("\n## ")[0].strip().splitlines()[-1] in printed  # the table was printed
    # the latency sweep on the replicated path: SAM/SAMPa falls below 1 by 50 ms; the
    # break-even is interpolated linearly between the two measured speedups
    rows = _rows(out)
    y0, y1 = (float(_row(rows, "ray", "replicated", lat)["sam_over_sampa"]) for lat in (0, 50))
    line = next(ln for ln in md.splitlines()
                if ln.startswith("| cnn | ray | replicated | latency |"))
    if y0 >= 1:
        value = float(line.split("**")[1].split()[0])  # "**13.4 ms** (between 0 and 50 ms)"
        assert value == pytest.approx((y0 - 1) / (y0 - y1) * 50, abs=0.05)
        assert "(between 0 and 50 ms)" in line
    else:  # a very busy machine: already below 1 without latency
        assert "below 1 already" in line
    for name in ("speedup_vs_bandwidth.png", "speedup_vs_latency.png", "breakdown.png"):
        assert (out / name).read_bytes()[:8] == PNG, name


def test_scaled_rows_carry_devices_and_workers_per_role(scaled: tuple[Path, str]) -> None:
    """One pass per k on its own actors: bench.csv a row per k, bench_runs.csv a row per
    algorithm run; SGD(k) and SAM(k) used k workers, their -ddp forms and SAMPa 2k, as the
    runs' own result.json say; grouped runs report an all-reduce, k = 1 SGD/SAM none."""
    import json

    out, _ = scaled
    rows = _rows(out)
    assert list(rows[0]) == list(COLUMNS)
    assert [int(r["workers_per_role"]) for r in rows] == [1, 2]  # ascending, whatever the order
    for r in rows:
        k = int(r["workers_per_role"])
        want = {"sgd": k, "sam": k, "sampa": 2 * k, "sgd_ddp": 2 * k, "sam_ddp": 2 * k}
        assert {a: float(r[f"{a}_devices"]) for a in want} == want
        times = {a: float(r[f"{a}_ms"]) for a in want}
        assert min(times.values()) > 0, times
        assert float(r["sam_ddp_over_sampa"]) == pytest.approx(
            times["sam_ddp"] / times["sampa"], rel=1e-12)
        assert float(r["sam_over_sampa"]) == pytest.approx(times["sam"] / times["sampa"],
                                                           rel=1e-12)
        assert float(r["sam_ddp_allreduce_ms"]) > 0  # data-parallel: always a group
        assert (float(r["sam_allreduce_ms"]) > 0) == (k > 1)
    runs = _rows(out, "bench_runs.csv")
    assert list(runs[0]) == list(RUN_COLUMNS)
    got = {(int(r["workers_per_role"]), r["algo"]): int(r["devices"]) for r in runs}
    assert got == {(k, a): k * (1 if a in ("sgd", "sam") else 2) for k in (1, 2) for a in ALGOS}
    for r in runs:
        wide = rows[int(r["workers_per_role"]) - 1]
        assert float(r["step_ms"]) == float(wide[r["algo"].replace("-", "_") + "_ms"])
        assert float(r["over_sampa"]) == pytest.approx(
            float(r["step_ms"]) / float(wide["sampa_ms"]), rel=1e-12)
    # each run's result.json kept; the -ddp runs were data-parallel over all 2k workers
    for k, name in ((1, "mlp-ray-replicated-lat0ms-bwnone-r1"),
                    (2, "mlp-ray-replicated-lat0ms-bwnone-k2-r1")):
        assert sorted(p.stem for p in (out / "runs" / name).glob("*.json")) == sorted(ALGOS)
        res = json.loads((out / "runs" / name / "sam-ddp.json").read_text())
        rg = res["role_groups"]
        assert (rg["workers_per_role"], rg["data_parallel"]) == (k, True)
        assert res["config"]["algo"] == "sam"
        assert sum(len(g) for g in rg["groups"].values()) == 2 * k
        sampa = json.loads((out / "runs" / name / "sampa.json").read_text())
        assert sampa["config"]["workers_per_role"] == k
        assert not sampa["config"]["data_parallel"]


def test_scaling_table_ratios_and_plot(scaled: tuple[Path, str]) -> None:
    """bench.md's "step time vs devices" table shows, per k, the csv's step times and SAMPa's
    speedups over SAM-DDP and SAM(k); the existing tables tell k apart; scaling.png is a PNG."""
    out, printed = scaled
    md = (out / "bench.md").read_text()
    assert "## Step time vs devices at a fixed global batch" in md
    assert "at latency 0 ms, uncapped bandwidth," in md
    assert "| mlp | ray | replicated k=2 | 0 | none | 1 |" in md  # the main table, k = 2
    section = md.split("## Step time vs devices at a fixed global batch")[1]
    lines = [ln for ln in section.splitlines() if ln.startswith("| mlp |")]
    assert len(lines) == 2
    for r, line in zip(_rows(out), lines, strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        k = int(r["workers_per_role"])
        assert cells[:5] == ["mlp", "ray", "replicated", str(k), f"{k} / {2 * k}"]
        assert cells[5:10] == [f"{float(r[c]):.1f}" for c in (
            "sgd_ms", "sam_ms", "sgd_ddp_ms", "sam_ddp_ms", "sampa_ms")]
        sam_ddp, sam, sampa = (float(r[c]) for c in ("sam_ddp_ms", "sam_ms", "sampa_ms"))
        assert cells[10:] == [f"{sam_ddp / sampa:.2f}", f"{sam / sampa:.2f}"]
    assert lines[-1] in printed
    assert (out / "scaling.png").read_bytes()[:8] == PNG


def test_scaling_outputs_only_when_asked(study: tuple[Path, str]) -> None:
    """A study with k = 1 and no baseline: no scaling table, no scaling.png, and bench_runs.csv
    holds the three algorithms with one worker per role."""
    out, _ = study
    assert "Step time vs devices" not in (out / "bench.md").read_text()
    assert not (out / "scaling.png").exists()
    runs = _rows(out, "bench_runs.csv")
    assert {(r["algo"], r["devices"], r["workers_per_role"]) for r in runs} == {
        ("sgd", "1", "1"), ("sam", "1", "1"), ("sampa", "2", "1")}


def test_refuses_a_folder_that_is_not_empty(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bench.csv").write_text("earlier study\n")
    assert run_cli(*TINY, "--out", str(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not empty" in err and "--overwrite" in err
    assert (tmp_path / "bench.csv").read_text() == "earlier study\n"


@pytest.mark.parametrize(("flags", "named"), [
    (["--latency-ms", "0", "-1"], "--latency-ms"),
    (["--latency-ms", "nan"], "--latency-ms"),
    (["--bandwidth-gbit", "none", "0"], "--bandwidth-gbit"),
    (["--bandwidth-gbit", "fast"], "--bandwidth-gbit"),
    (["--models", "resnet20", "resnet9000"], "--models"),
    (["--transports", "tcp"], "--transports"),
    (["--transports", "grpc", "--data-paths", "replicated"], "--data-paths"),
    (["--repeats", "0"], "--repeats"),
    (["--steps", "1"], "--steps"),
    (["--device", "tpu"], "--device"),
    (["--wire-dtype", "fp16"], "--wire-dtype"),
    (["--workers-per-role", "0"], "--workers-per-role"),
    (["--workers-per-role", "1", "-1"], "--workers-per-role"),
    (["--workers-per-role", "x"], "--workers-per-role"),
    (["--workers-per-role", "1.5"], "--workers-per-role"),
    (["--workers-per-role", "65"], "--workers-per-role"),
    (["--workers-per-role", "2", "--transports", "grpc"], "--workers-per-role"),
    (["--baseline", "foo"], "--baseline"),
    (["--baseline", "ddp", "--transports", "grpc"], "--baseline"),
    (["--baseline", "ddp", "--workers-per-role", "2", "--batch-size", "3"], "--batch-size"),
])
def test_bad_flags_are_one_line_exit_2(flags: list[str], named: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "never"
    args = build_parser().parse_args(["bench", *flags, "--out", str(out)])
    with pytest.raises(UserError, match=named):
        args.func(args)
    assert run_cli(*flags, "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sampa-ray: {named}") and err.count("\n") == 1
    assert not out.exists()


# -- pure functions on known numbers ------------------------------------------------------------
def test_break_even_bandwidth_interpolates_in_log_space() -> None:
    # 1.2 at 1 Gbit/s, 0.8 at 0.1: halfway in (1.2 - 1) / (1.2 - 0.8) = 0.5 of the way from
    # log10(1) = 0 to log10(0.1) = -1, so log10(b) = -0.5 and b = 10 ** -0.5 = 0.3162 Gbit/s
    be = break_even([10, 1, 0.1], [1.8, 1.2, 0.8], log_x=True)
    assert be.kind == "crossed" and be.bracket == (1, 0.1)
    assert be.value == pytest.approx(0.31622776601683794, rel=1e-12)
    # uncapped first changes nothing; 1.0 itself is not below 1
    be = break_even([math.inf, 10, 1, 0.1], [2.0, 1.0, 1.2, 0.8], log_x=True)
    assert be.value == pytest.approx(10 ** -0.5, rel=1e-12)
    # exactly 1.0 at a measured point (not below 1): the crossing starts there
    be = break_even([1, 0.1], [1.0, 0.6], log_x=True)
    assert be.value == pytest.approx(1.0)
    be = break_even([10, 0.1], [1.5, 0.5], log_x=True)  # halfway in log: 10 ** 0 = 1
    assert be.value == pytest.approx(1.0, rel=1e-12)


def test_break_even_latency_edges_and_uncapped() -> None:
    # 1.1 at 5 ms, 0.7 at 20 ms: 5 + (0.1 / 0.4) * 15 = 8.75 ms (linear in ms)
    be = break_even([0, 5, 20], [1.5, 1.1, 0.7], log_x=False)
    assert (be.kind, be.bracket) == ("crossed", (5, 20))
    assert be.value == pytest.approx(8.75, rel=1e-12)
    assert break_even([0, 5, 20], [1.9, 1.5, 1.01], log_x=False) == BreakEven("never")
    assert break_even([0, 5], [0.9, 0.5], log_x=False) == BreakEven("always")
    assert break_even([0, 5, 20], [1.5, math.nan, 0.5], log_x=False).value == \
        pytest.approx(0 + 0.5 / 1.0 * 20)
    # between the uncapped link and 10 Gbit/s: no position to interpolate from
    be = break_even([math.inf, 10, 1], [1.1, 0.9, 0.7], log_x=True)
    assert (be.kind, be.value, be.bracket) == ("crossed", None, (math.inf, 10))


def test_bandwidth_order_and_aggregate_spread() -> None:
    assert parse_bandwidths(["1", "none", "10", "0.1", "1"]) == [None, 10.0, 1.0, 0.1]
    assert parse_workers_per_role(["4", "1", "2", "4"]) == [1, 2, 4]
    assert Stat.of([3.0, 1.0, 2.0]).fmt() == "2.0 (1.0–3.0)"
    base = {"model": "m", "transport": "ray", "data_path": "points", "latency_ms": 0.0,
            "bandwidth_gbit": "none"}
    rows = [{**base, **dict.fromkeys(METRICS, v)} for v in (1.0, 5.0, 2.0)]
    rows.append({**base, "latency_ms": 5.0, **dict.fromkeys(METRICS, 7.0)})
    aggs = aggregate(rows)
    assert [a.repeats for a in aggs] == [3, 1]
    s = aggs[0].stats["sam_over_sampa"]
    assert (s.median, s.lo, s.hi) == (2.0, 1.0, 5.0)


def test_round_split_from_result_json() -> None:
    """transfer = round - compute - copy - wait per role; wait from the trace's compute ends."""
    def summ(v: float) -> dict[str, float]:
        return {"count": 3, "median": v}

    result = {
        "timings": {
            "round_seconds": summ(0.100), "update_seconds": summ(0.002),
            "step_seconds": summ(0.105),
            "workers": {
                "perturbed": {"compute": summ(0.030), "copy_in": summ(0.001),
                              "copy_out": summ(0.001)},
                "extrapolated": {"compute": summ(0.040), "copy_in": summ(0.002),
                                 "copy_out": summ(0.002)}}},
        "trace": [  # extrapolated finishes 10 ms after perturbed in every round
            {"round": 0, "role": "extrapolated", "start": 0.0, "end": 0.05},
            *({"round": i, "role": role, "start": 0.0, "end": i + (0.02 if role == "perturbed"
                                                                   else 0.03)}
              for i in (1, 2, 3) for role in ("perturbed", "extrapolated"))],
    }
    b = sampa_breakdown(result)
    assert b["perturbed_wait"] == pytest.approx(0.010)
    assert b["extrapolated_wait"] == pytest.approx(0.0)
    assert b["perturbed_transfer"] == pytest.approx(0.100 - 0.030 - 0.002 - 0.010)
    assert b["extrapolated_transfer"] == pytest.approx(0.100 - 0.040 - 0.004)
    assert b["other"] == pytest.approx(0.003)
    assert b["transfer"] == pytest.approx((0.058 + 0.056) / 2)


def test_round_costs_from_result_json() -> None:
    """The per-round costs (``BenchSpec.round_costs``, benchmarks/bench_ray.py): the slower
    role's compute, and per round the time from one round's last gradient to the next one's
    less that round's longest compute, the first two rounds left out."""
    from sampa_ray.study.report import round_costs

    def run(roles: dict[str, float], trace: list[tuple[int, float, float]]) -> dict:
        return {"timings": {"workers": {r: {"compute": {"count": 3, "median": c}}
                                        for r, c in roles.items()}},
                "trace": [{"round": k, "role": "perturbed", "start": s, "end": e}
                          for k, s, e in trace]}

    # rounds 2, 3, 4 end at 1.0, 1.5, 2.1; their longest computes are 0.4 and 0.5 after round 2
    trace = [(0, 0.0, 0.1), (1, 0.2, 0.5), (2, 0.6, 1.0), (3, 1.1, 1.5), (4, 1.6, 2.1)]
    c = round_costs({"sgd": run({"perturbed": 0.03}, trace),
                     "sampa": {**run({"perturbed": 0.03, "extrapolated": 0.05}, trace),
                               "collective": {"backend": "gloo"}}})
    assert c["one_busy_compute_ms"] == pytest.approx(30.0)
    assert c["both_busy_compute_ms"] == pytest.approx(50.0)
    # gaps: (1.5 - 1.0 - 0.4) = 0.1 and (2.1 - 1.5 - 0.5) = 0.1
    assert c["sgd_overhead_ms"] == pytest.approx(100.0)
    assert c["sampa_overhead_ms"] == pytest.approx(100.0)
    assert c["collective"] == "gloo"
    assert math.isnan(round_costs({"sgd": run({"p": 0.0}, trace[:3]),
                                   "sampa": run({"p": 0.0}, trace[:3])})["sgd_overhead_ms"])
