"""The run's record stays bounded however long the run: summaries exact where cheap (count, mean,
min, max), medians and p90 from a bounded sample (exact while the series fits in it), a bounded
trace; and the record survives a checkpoint, so resuming keeps the timings."""

from __future__ import annotations

import json
import math
import statistics
import sys
import tracemalloc
from typing import Any

import pytest
import torch

from sampa_ray.engine import GradResult
from sampa_ray.results import RESERVOIR, TRACE_ROUNDS, Recorder, Stat

ROLES = ("perturbed", "extrapolated")


def _results(k: int) -> dict[str, GradResult]:
    """One SAMPa round's results, with timings that vary from round to round."""
    g = torch.empty(0)
    return {role: GradResult(g, loss=1.0 / (k + 1), accuracy=0.5,
                             timings={"compute": 0.01 + (k % 7) * 1e-3, "copy_in": 1e-4,
                                      "copy_out": 2e-4 + i * 1e-5},
                             start=1000.0 + k, end=1000.5 + k)
            for i, role in enumerate(ROLES)}


def _play(rec: Recorder, rounds: int, start: int = 0) -> None:
    for k in range(start, start + rounds):
        rec.record_round(_results(k), 0.02 + (k % 11) * 1e-3, 1e-3)
        rec.record_step(0.03 + (k % 5) * 1e-3)
        if (k + 1) % 1000 == 0:
            rec.end_epoch((k + 1) / 1000, k + 1, 0.1)


def _sizes(rec: Recorder) -> dict[str, int]:
    """The length of every container the recorder holds, and their shallow sizes in bytes."""
    stats = [rec.round_s, rec.update_s, rec.step_s, rec.update_compute_s,
             *(s for d in rec.worker.values() for s in d.values())]
    return {"sample_len": sum(len(s.sample) for s in stats),
            "sample_bytes": sum(sys.getsizeof(s.sample) for s in stats),
            "trace_len": len(rec.trace), "series": len(stats)}


def test_recorder_state_is_bounded_over_20000_rounds() -> None:
    """20,000 rounds hold what 2,000 rounds hold, but for the per-epoch rows (a few hundred bytes
    an epoch): no per-round list grows."""
    rec = Recorder("extrapolated")
    _play(rec, 2_000)
    early = _sizes(rec)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        _play(rec, 18_000, start=2_000)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    late = _sizes(rec)
    assert rec.rounds == 20_000
    assert late == early
    assert late["sample_len"] == late["series"] * RESERVOIR  # every series is at its cap
    assert late["trace_len"] == TRACE_ROUNDS * len(ROLES)
    grown = sum(s.size_diff for s in after.compare_to(before, "filename")
                if "results.py" in str(s.traceback))
    epochs_added = 18  # one row per 1000 rounds, a small dict each
    assert grown < 2_000 * epochs_added, grown  # not the ~2 KB per round of a list per series


def test_summaries_are_exact_where_cheap_and_close_for_medians() -> None:
    rec = Recorder("extrapolated")
    _play(rec, 20_000)
    rounds = [0.02 + (k % 11) * 1e-3 for k in range(20_000)]
    s = rec.timing_summary()["round_seconds"]
    assert s["count"] == 20_000
    assert s["min"] == min(rounds) and s["max"] == max(rounds)
    assert s["mean"] == pytest.approx(statistics.fmean(rounds), rel=1e-9)
    # 11 equally likely values: the sample's median and p90 land on the true ones or next door
    assert abs(s["median"] - statistics.median(rounds)) <= 1.01e-3
    assert abs(s["p90"] - sorted(rounds)[int(0.9 * len(rounds))]) <= 1.01e-3
    t = rec.timing_summary()
    assert set(t) == {"nonfinite_rounds", "gradient_bytes", "allreduce_bytes", "step_seconds",
                      "round_seconds",
                      "update_seconds", "update_compute_seconds", "workers"}
    assert set(t["workers"]) == set(ROLES)
    assert t["workers"]["perturbed"]["compute"]["count"] == 20_000
    assert t["step_seconds"]["count"] == 20_000 - 1  # the first update holds start-up


def test_small_series_summaries_equal_the_exact_ones() -> None:
    """Up to RESERVOIR values the sample is the whole series: what result.json always said."""
    values = [0.5, 0.1, 0.3, 0.9, 0.2, 0.7]
    st = Stat()
    for v in values:
        st.add(v)
    s = sorted(values)
    assert st.summary() == {"count": 6, "mean": pytest.approx(statistics.fmean(values)),
                            "median": statistics.median(values), "p90": s[int(0.9 * 6)],
                            "min": 0.1, "max": 0.9}
    assert Stat().summary() == {"count": 0}


def test_the_record_survives_a_checkpoint_with_its_timings() -> None:
    """A checkpoint's record (plain JSON) carries the timings: a run resumed at its end (a
    finished run resumed) writes the same summaries, not empty ones."""
    rec = Recorder("extrapolated")
    _play(rec, 3_000)
    rec.nonfinite_rounds = 2
    saved: dict[str, Any] = json.loads(json.dumps(rec.state_dict()))
    assert len(json.dumps(saved)) < 200_000  # bounded: a sample per series, not every round
    back = Recorder("extrapolated")
    back.load_state(saved)
    assert back.timing_summary() == rec.timing_summary()
    assert back.rounds == 3_000 and back.trace == rec.trace and back.epochs == rec.epochs
    _play(back, 10, start=3_000)  # and it goes on counting
    assert back.timing_summary()["round_seconds"]["count"] == 3_010
    assert back.timing_summary()["step_seconds"]["count"] == 2_999 + 9


def test_an_old_checkpoint_record_without_timings_loads() -> None:
    rec = Recorder("extrapolated")
    rec.load_state({"rounds": 5, "epochs": [], "elapsed_s": 1.0})
    assert rec.rounds == 5 and rec.timing_summary()["round_seconds"] == {"count": 0}
    assert math.isnan(rec.last_loss)


def test_resuming_a_finished_run_keeps_its_timings(tmp_path) -> None:  # noqa: ANN001
    """A finished run resumed has nothing left to do; its result.json still holds the timings
    of the rounds it ran (they come back from the checkpoint), not empty summaries."""
    from sampa_ray.config import make_config
    from sampa_ray.local import run_local

    cfg = make_config({"backend": "local", "model": "mlp", "steps": 12, "batch_size": 32,
                       "threads": 1, "checkpoint_every": 4})
    out = tmp_path / "run"
    first = run_local(cfg, out)
    again = run_local(cfg.model_copy(update={"resume": str(out)}), out)
    saved = json.loads((out / "result.json").read_text())
    for res in (again, saved):
        t = res["timings"]
        assert t["round_seconds"]["count"] == first["timings"]["round_seconds"]["count"] == 13
        assert t["round_seconds"] == first["timings"]["round_seconds"]
        assert t["step_seconds"] == first["timings"]["step_seconds"]
        assert t["workers"] == first["timings"]["workers"]
        assert res["trace"] == first["trace"]
    assert again["steps"] == first["steps"] == 12


def test_compute_per_update_is_the_critical_path_summed_over_the_update_rounds() -> None:
    """SAM-like: two sequential rounds per update on one worker; SAMPa-like: two workers in one
    round, the slower one counts. The first update after a start is left out, as for step
    times, and a checkpoint keeps the series."""
    g = torch.empty(0)

    def res(**compute: float) -> dict[str, GradResult]:
        return {role: GradResult(g, 1.0, 0.5, timings={"compute": c})
                for role, c in compute.items()}

    rec = Recorder("ascent")
    for k in range(4):  # update k: ascent 0.01 + perturbed 0.02 + k / 100
        rec.record_round(res(ascent=0.01), 0.0, 0.0)
        rec.record_round(res(perturbed=0.02 + k / 100), 0.0, 0.0)
        rec.record_step(1.0)
    summary = rec.timing_summary()["update_compute_seconds"]
    assert summary["count"] == 3 and summary["min"] == pytest.approx(0.04)
    assert summary["mean"] == pytest.approx((0.04 + 0.05 + 0.06) / 3)

    rec = Recorder("extrapolated")
    rec.record_round(res(extrapolated=0.5), 0.0, 0.0)  # bootstrap: folded into the first update
    for k in range(3):
        rec.record_round(res(perturbed=0.03, extrapolated=0.01 + k / 100), 0.0, 0.0)
        rec.record_step(1.0)
    again = Recorder("extrapolated")
    again.load_state(rec.state_dict())
    for r in (rec, again):
        s = r.timing_summary()["update_compute_seconds"]
        assert s["count"] == 2 and s["max"] == pytest.approx(0.03) and s["min"] == \
            pytest.approx(0.03)
