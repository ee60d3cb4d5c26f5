"""A SAMPa run on Ray with the gRPC transport, fuzzed while it trains: malformed messages at the
running coordinator's data plane (unknown runs and roles, stale and future steps, wrong lengths
and dtypes, bad framing, non-finite values and losses, undecodable bytes) each get their code, and
the run ends bit for bit where a clean run of the same configuration does."""

from __future__ import annotations

import json
import math
import os
import random
import re
import time
from collections import Counter
from typing import Any

import grpc
import numpy as np
from conftest import assert_same_final, in_thread, start_run
from grpc_fuzz import (
    AE,
    FETCH,
    FP,
    IA,
    MIN_SENT,
    NEAR_ROLES,
    NF,
    OK,
    OPEN,
    ROLES,
    SENT,
    SERVING,
    UNDECODABLE,
    MiB,
    Reply,
    health_status,
    push_raw,
    unary_stream_raw,
)

from sampa_ray.config import make_config
from sampa_ray.local import run_local
from sampa_ray.proto.sampa.v1 import parameter_service_pb2 as ppb
from sampa_ray.proto.sampa.v1 import tensor_pb2
from sampa_ray.transport.grpc.client import auth_metadata, get_status
from sampa_ray.transport.grpc.data_plane import PARAMETER_SERVICE

LIVE_STEPS = 120

CURRENT = re.compile(r"is not the current step (-?\d+)")


class LiveFuzzer:
    """Malformed messages at a running coordinator's data plane. The current round is learnt
    from the coordinator's own answer to a probe (a fetch for step -1); a message aimed at the
    current round may meet the round moving on, and is then refused for that (with details that
    show it) instead."""

    def __init__(self, ch: grpc.Channel, run_id: str, token: str | None) -> None:
        self.ch, self.run_id = ch, run_id
        self.md = auth_metadata(token)
        self.rng = random.Random(20240611)
        self.sent = 0
        self.racy: Counter[str] = Counter()
        self.hits: Counter[str] = Counter()
        self.round = 0
        self.numel = self.learn_numel()
        self.nbytes = self.numel * 4

    def learn_numel(self) -> int:
        """The run's parameter count, from the point of the current round (a correct fetch,
        as a worker makes it; not counted as fuzz)."""
        for _ in range(200):
            step = self.probe()
            code, details, chunks = unary_stream_raw(self.ch, FETCH, ppb.PointRequest(
                run_id=self.run_id, step=step, role=OPEN).SerializeToString(), metadata=self.md)
            if code == OK:
                first = tensor_pb2.TensorChunk.FromString(chunks[0])
                assert first.dtype == "float32" and first.total_bytes == first.shape[0] * 4
                return int(first.shape[0])
            assert code == FP, details  # the round moved on, or OPEN's gradient is in
        raise AssertionError("no point of the current round could be fetched")

    def head(self, step: int, role: str = OPEN, **kw: Any) -> ppb.GradientHeader:
        base: dict[str, Any] = {"run_id": self.run_id, "step": step, "role": role,
                                "dtype": "float32", "shape": [self.numel],
                                "numel": self.numel, "loss": 0.5, "accuracy": 0.5}
        return ppb.GradientHeader(**{**base, **kw})

    def chunk(self, offset: int, data: bytes, total: int | None = None,
              numel: int | None = None) -> tensor_pb2.TensorChunk:
        return tensor_pb2.TensorChunk(
            dtype="float32", shape=[self.numel if numel is None else numel],
            total_bytes=self.nbytes if total is None else total, offset=offset, data=data)

    def push(self, msgs: list[ppb.GradientChunk | bytes]) -> Reply:
        raw = [m if isinstance(m, bytes) else m.SerializeToString() for m in msgs]
        self.sent += 1
        return push_raw(self.ch, raw, metadata=self.md)

    def fetch(self, run_id: str, step: int, role: str) -> Reply:
        self.sent += 1
        return unary_stream_raw(self.ch, FETCH, ppb.PointRequest(
            run_id=run_id, step=step, role=role).SerializeToString(), metadata=self.md)

    def probe(self) -> int:
        """The current round, from the refusal of a fetch for step -1."""
        code, details, _ = self.fetch(self.run_id, -1, OPEN)
        m = CURRENT.search(details)
        assert code == FP and m, (code, details)
        step = int(m.group(1))
        assert step >= self.round  # rounds only move forward
        self.round = step
        return step

    def finite(self) -> np.ndarray:
        return np.random.default_rng(self.rng.randrange(2**32)).standard_normal(
            self.numel).astype("<f4")

    def other_run(self) -> str:
        r = self.rng.choice(["", self.run_id.upper() + "X", self.run_id + " ", self.run_id[:-1],
                             f"{self.rng.randrange(16**12):012x}", "run-1"])
        return r if r != self.run_id else r + "?"

    # every case: (kind, got, wanted code, codes a race with the round may give instead)
    def one(self, i: int) -> tuple[str, Reply, grpc.StatusCode, tuple[grpc.StatusCode, ...]]:
        rng, kind = self.rng, CASES[i % len(CASES)]
        full = self.finite().tobytes()
        role = rng.choice(ROLES)
        if kind == "push: unknown run":
            step = self.round + rng.choice([0, 1, -1, 10**6])
            return kind, self.push([ppb.GradientChunk(
                header=self.head(step, role, run_id=self.other_run()),
                chunk=self.chunk(0, full))]), NF, ()
        if kind == "fetch: unknown run":
            return kind, self.fetch(self.other_run(), self.round, role), NF, ()
        if kind == "push: stale step":  # a correct-looking gradient for an old round
            step = rng.choice([self.round - 1, self.round - 1 - rng.randrange(50), 0, -1,
                               -(2**63)])
            return kind, self.push([ppb.GradientChunk(header=self.head(step, role),
                                                      chunk=self.chunk(0, full))]), FP, ()
        if kind == "push: future step":
            step = rng.choice([self.round + 10**6, 2**63 - 1, self.round + 10**6 + 17])
            return kind, self.push([ppb.GradientChunk(header=self.head(step, role),
                                                      chunk=self.chunk(0, full))]), FP, ()
        if kind == "fetch: wrong step":
            step = rng.choice([self.round - 1, -5, self.round + 10**6, 2**63 - 1])
            return kind, self.fetch(self.run_id, step, role), FP, ()
        if kind == "undecodable":
            junk = rng.choice([b"\xff\xff", b"\x0a\x80", b"\x07", bytes([0x0a, 50]) + b"a"])
            if rng.random() < 0.5:
                self.sent += 1
                return kind, unary_stream_raw(self.ch, FETCH, junk, metadata=self.md), \
                    UNDECODABLE, ()
            return kind, self.push([junk]), UNDECODABLE, ()
        # aimed at the current round: learn it first
        step = self.probe()
        if kind == "push: unknown role":
            bad = rng.choice(NEAR_ROLES)
            return kind, self.push([ppb.GradientChunk(header=self.head(step, bad),
                                                      chunk=self.chunk(0, full))]), NF, (FP,)
        if kind == "fetch: unknown role":
            return kind, self.fetch(self.run_id, step, rng.choice(NEAR_ROLES)), NF, (FP,)
        if kind == "push: wrong length":  # consistent, valid-looking, the wrong length
            n = rng.choice([self.numel - 1, self.numel + 1, 1, self.numel // 2,
                            self.numel + rng.randrange(1, 999)])
            data = np.zeros(n, dtype="<f4").tobytes()
            shape = rng.choice([[n], [self.numel]])
            return kind, self.push([ppb.GradientChunk(
                header=self.head(step, role, shape=shape, numel=n),
                chunk=self.chunk(0, data, len(data), n))]), IA, (FP,)
        if kind == "push: wrong dtype":
            return kind, self.push([ppb.GradientChunk(
                header=self.head(step, role, dtype=rng.choice(["float64", "float16", "",
                                                               "bfloat16"])),
                chunk=self.chunk(0, full))]), IA, (FP,)
        if kind == "push: non-finite loss":
            return kind, self.push([ppb.GradientChunk(
                header=self.head(step, role, loss=rng.choice([math.nan, math.inf])),
                chunk=self.chunk(0, full))]), IA, (FP,)
        # a correct header, then bad chunks: the role may also be in already
        if kind == "push: bad framing":
            cut = rng.randrange(4, self.nbytes - 4)
            msgs = rng.choice([
                [self.chunk(0, full[:-4], self.nbytes - 4)],  # wrong total length
                [self.chunk(4, full[4:])],  # first chunk not at 0
                [self.chunk(0, full[:cut]), self.chunk(cut + 4, full[cut + 4:])],  # gap
                [self.chunk(0, full[:cut]), self.chunk(cut - 4, full[cut - 4:])],  # overlap
                [self.chunk(0, full[:cut]), self.chunk(cut, b""), self.chunk(cut, full[cut:])],
                [self.chunk(0, full), self.chunk(self.nbytes, b"\0" * 4)],  # past the end
                [self.chunk(0, full[:cut])],  # ends early
                [self.chunk(0, b"\0" * (MiB + 4))],  # chunk over 1 MiB
            ])
            return kind, self.push([ppb.GradientChunk(header=self.head(step, role),
                                                      chunk=msgs[0])]
                                   + [ppb.GradientChunk(chunk=c) for c in msgs[1:]]), IA, (AE, FP)
        assert kind == "push: non-finite values"
        g = np.frombuffer(full, dtype="<f4").copy()
        g[rng.randrange(self.numel)] = rng.choice([math.nan, math.inf, -math.inf])
        raw = g.tobytes()
        cut = rng.randrange(1, self.nbytes)
        return kind, self.push([ppb.GradientChunk(header=self.head(step, role),
                                                  chunk=self.chunk(0, raw[:cut])),
                                ppb.GradientChunk(chunk=self.chunk(cut, raw[cut:]))]), IA, \
            (AE, FP)

    def check(self, kind: str, got: Reply, want: grpc.StatusCode,
              racy: tuple[grpc.StatusCode, ...]) -> None:
        code, details, _ = got
        if racy:
            self.racy[kind] += 1
        if code == want:
            self.hits[kind] += 1
            if want == UNDECODABLE:
                assert "DecodeError" in details, details
            return
        assert code in racy, f"{kind}: expected {want.name}, got {code.name}: {details}"
        if code == FP:  # the round moved on: the details say so
            m = CURRENT.search(details)
            assert (m and int(m.group(1)) > self.round) or "moved on" in details, (kind, details)
        else:  # the role's gradient came in first
            assert code == AE and "already in" in details, (kind, details)


CASES = ["push: unknown run", "push: wrong length", "push: stale step", "push: bad framing",
         "fetch: unknown run", "push: unknown role", "push: future step",
         "push: non-finite values", "fetch: wrong step", "push: wrong dtype", "undecodable",
         "fetch: unknown role", "push: non-finite loss"]


def test_live_run_under_fuzz_ends_exactly_like_a_clean_run(ray_local: None, tmp_path: Any
                                                            ) -> None:
    """A SAMPa run on Ray with the gRPC transport, fuzzed while it trains: every malformed
    message gets its code, the run completes all its steps with no restart or retry, and its
    final parameters are bit for bit those of a clean run of the same configuration."""
    cfg = make_config({"algo": "sampa", "model": "cnn", "dataset": "digits",
                       "steps": LIVE_STEPS, "batch_size": 32, "threads": 1, "backend": "ray",
                       "transport": "grpc"})
    token = os.environ.get("SAMPA_RAY_TOKEN") or None
    out = tmp_path / "fuzzed"
    t, box, target = start_run(cfg, out)
    deadline = time.time() + 120
    while time.time() < deadline:
        st_ = get_status(target, token=token)
        if st_["state"] == "running" and st_["step"] >= 2:
            break
        assert t.is_alive(), box.get("error")
        time.sleep(0.05)
    assert st_["transport"] == "grpc" and st_["total_steps"] == LIVE_STEPS
    run_id = st_["run_id"]
    assert run_id

    with grpc.insecure_channel(target) as ch:
        fz = LiveFuzzer(ch, run_id, token)
        i = 0
        while fz.sent < MIN_SENT["live"]:
            if i % 20 == 0:  # leave the run time to finish with the fuzzing done
                assert get_status(target, token=token)["step"] < LIVE_STEPS - 20, \
                    f"the run got ahead of the fuzzing ({fz.sent} messages sent)"
            fz.check(*fz.one(i))
            i += 1
        during = get_status(target, token=token)
        assert during["state"] == "running" and during["step"] < LIVE_STEPS
        assert health_status(target) == SERVING
        assert health_status(target, PARAMETER_SERVICE) == SERVING
    SENT["live"] += fz.sent
    # the race with the round is real but rare: the codes aimed at are what mostly comes back
    assert all(fz.hits[k] > 0 for k in CASES), (fz.hits, fz.racy)
    assert sum(fz.hits[k] for k in fz.racy) >= sum(fz.racy.values()) // 2, (fz.hits, fz.racy)

    # the clean reference, in this process, while the fuzzed run finishes
    local, ref_box = in_thread(lambda: run_local(cfg, tmp_path / "clean"))
    t.join(timeout=300)
    local.join(timeout=300)
    assert not t.is_alive() and "error" not in box, box.get("error")
    assert not local.is_alive() and "error" not in ref_box, ref_box.get("error")
    result, clean = box["result"], ref_box["result"]
    assert result["steps"] == LIVE_STEPS and not result["stopped_early"]
    assert result["worker_restarts"] == 0 and result["retried_rounds"] == 0
    assert result["gradient_rounds"] == clean["gradient_rounds"] == LIVE_STEPS + 1
    saved = json.loads((out / "result.json").read_text())
    assert saved["steps"] == LIVE_STEPS and saved["planned_steps"] == LIVE_STEPS
    assert saved["num_params"] == fz.numel and saved["transport"] == "grpc"
    assert saved["final_test_accuracy"] == clean["final_test_accuracy"]
    assert_same_final(out, tmp_path / "clean")
    assert SENT["live"] >= MIN_SENT["live"]
