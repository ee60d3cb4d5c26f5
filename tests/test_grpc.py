"""The gRPC layer on real servers on loopback with real channels: codec, data plane (bitwise round
trips, a WRN-28-10-sized gradient, every rejection and its status code), health, reflection,
token, TLS, and the control plane with the control-API client functions."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import math
import pickle
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from conftest import LoopThread, free_port, self_signed
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from sampa_ray.cli.control import add_control_commands
from sampa_ray.errors import UserError
from sampa_ray.proto.sampa.v1 import parameter_service_pb2 as ppb
from sampa_ray.proto.sampa.v1 import parameter_service_pb2_grpc as pgrpc
from sampa_ray.proto.sampa.v1 import tensor_pb2
from sampa_ray.transport.codec import (
    CodecError,
    Receiver,
    assemble,
    chunk_count,
    encode_chunks,
    tensor_chunks,
)
from sampa_ray.transport.grpc import client as control
from sampa_ray.transport.grpc.client import PointClient, TransportError
from sampa_ray.transport.grpc.control_plane import COORDINATOR_SERVICE, ProgressHub, status_message
from sampa_ray.transport.grpc.data_plane import PARAMETER_SERVICE, RoundBoard
from sampa_ray.transport.grpc.server import set_not_serving, start_server, stop_server

RUN = "run-1"
SC = grpc.StatusCode
MiB = 1 << 20


@contextmanager
def serving(lt: LoopThread, numel: int | None, handler: Any = None, **kw: Any
            ) -> Iterator[tuple[RoundBoard | None, str, grpc.aio.Server]]:
    board = RoundBoard(RUN, numel) if numel is not None else None
    server, port = lt.run(start_server(board, handler, **kw))
    try:
        yield board, f"127.0.0.1:{port}", server
    finally:
        lt.run(stop_server(server, 0))


def pattern(n: int, seed: int = 0) -> torch.Tensor:
    """Random fp32 values plus the awkward ones (-0.0, subnormals, extremes)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, generator=g)
    special = torch.tensor([-0.0, 1e-45, -1e-40, 3.4e38, -3.4e38, 1.0])
    k = min(n, len(special))
    t[:k] = special[:k]
    return t


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


# -- codec ---------------------------------------------------------------------------------------
def test_encode_chunks_are_zero_copy_views() -> None:
    t = torch.arange(300_000, dtype=torch.float32)
    chunks = list(encode_chunks(t))
    assert [o for o, _ in chunks] == [0, MiB]
    assert [len(c) for _, c in chunks] == [MiB, 300_000 * 4 - MiB]
    t[0] = 42.0  # the chunks are views of the tensor's memory
    assert np.frombuffer(chunks[0][1], dtype="<f4")[0] == 42.0
    assert chunk_count(0) == 1 and chunk_count(MiB) == 1 and chunk_count(MiB + 1) == 2
    assert [len(c) for _, c in encode_chunks(torch.empty(0))] == [0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_assemble_roundtrip_bitwise(dtype: torch.dtype) -> None:
    t = pattern(70_001).to(dtype)
    out = torch.empty_like(t)
    assemble(tensor_chunks(t, chunk_bytes=4096), out, max_chunk_bytes=4096)
    assert bits(out) == bits(t)
    strided = pattern(1000).reshape(10, 100).t()  # not contiguous: copied first
    out2 = torch.empty(100, 10)
    assemble(tensor_chunks(strided), out2)
    assert torch.equal(out2, strided)


def test_receiver_rejects_every_mismatch() -> None:
    t = pattern(1000)
    chunks = list(tensor_chunks(t, chunk_bytes=1024))
    assert len(chunks) == 4

    def fresh() -> Receiver:
        return Receiver(torch.empty(1000), max_chunk_bytes=1024)

    cases: list[tuple[str, Callable[[Receiver], None]]] = [
        ("dtype 'float64'", lambda r: r.check_meta("float64", [1000], 4000)),
        ("shape [999]", lambda r: r.check_meta("float32", [999], 4000)),
        ("total_bytes 3996", lambda r: r.check_meta("float32", [1000], 3996)),
        ("at offset 1024, expected 0", lambda r: r.feed(1024, b"\0" * 1024)),
        ("more than the 1024 allowed", lambda r: r.feed(0, b"\0" * 1025)),
        ("is empty", lambda r: r.feed(0, b"")),
        ("at offset 512, expected 1024",
         lambda r: (r.feed(0, b"\0" * 1024), r.feed(512, b"\0" * 1024))),
        ("past the end", lambda r: [r.add(c) for c in chunks[:3]] and r.feed(3072, b"\0" * 1000)),
        ("ended after 3072 of 4000",
         lambda r: ([r.add(c) for c in chunks[:3]], r.finish())),
        ("after the tensor was complete",
         lambda r: ([r.add(c) for c in chunks], r.feed(4000, b"\0" * 4))),
        ("held no chunk", lambda r: r.finish()),
    ]
    for expected, action in cases:
        with pytest.raises(CodecError, match=re.escape(expected)):
            action(fresh())
    with pytest.raises(CodecError, match="dtype"):
        Receiver(torch.empty(3, dtype=torch.complex64))
    with pytest.raises(CodecError, match="not contiguous"):
        Receiver(torch.empty(4, 4).t())
    r = fresh()
    for c in chunks:
        r.add(c)
    assert torch.equal(r.finish(), t)
    assert issubclass(CodecError, ValueError)


# -- the data plane ------------------------------------------------------------------------------
@pytest.mark.parametrize("numel", [0, 1, 7, MiB // 4, MiB // 4 + 1, 700_003])
def test_points_and_gradients_roundtrip_bitwise(lt: LoopThread, numel: int) -> None:
    with serving(lt, numel) as (board, target, _):
        assert board is not None
        clients = [PointClient(target, RUN) for _ in range(2)]
        points = {"perturbed": pattern(numel, 1), "extrapolated": pattern(numel, 2)}
        futs = lt.call(board.open_round, 5, points)
        grads = {"perturbed": pattern(numel, 3), "extrapolated": pattern(numel, 4)}
        expect_chunks = chunk_count(numel * 4)

        def work(i: int, role: str) -> None:
            out = torch.full((numel,), float("nan"))
            clients[i].fetch_point(5, role, out)
            assert bits(out) == bits(points[role])
            assert clients[i].last_chunks == expect_chunks
            secs = clients[i].push_gradient(5, role, grads[role], 0.5 + i, 0.25 * i,
                                            {"compute": 0.01 * (i + 1)})
            assert secs > 0 and clients[i].last_chunks == expect_chunks

        with ThreadPoolExecutor(2) as pool:  # both workers at once
            for f in [pool.submit(work, i, r) for i, r in enumerate(grads)]:
                f.result(60)
        for i, role in enumerate(grads):
            grad, meta = lt.wait(futs[role])
            assert bits(grad) == bits(grads[role])
            assert meta["loss"] == 0.5 + i and meta["accuracy"] == 0.25 * i
            assert meta["timings"] == {"compute": 0.01 * (i + 1)}
            assert meta["chunks"] == expect_chunks and meta["bytes"] == numel * 4
            assert meta["step"] == 5 and meta["role"] == role
        assert board.received == {"perturbed", "extrapolated"}
        for c in clients:
            c.close()


def test_wrn28_10_sized_gradient_crosses_intact_in_1mib_chunks(lt: LoopThread) -> None:
    numel = 36_500_000  # 146 MB of fp32, the size of WRN-28-10's gradient
    with serving(lt, numel) as (board, target, _):
        assert board is not None
        grad = torch.randn(numel, generator=torch.Generator().manual_seed(7))
        point = torch.randn(numel, generator=torch.Generator().manual_seed(8))
        futs = lt.call(board.open_round, 0, {"perturbed": point})
        with PointClient(target, RUN) as client:
            out = torch.empty(numel)
            client.fetch_point(0, "perturbed", out)
            assert torch.equal(out, point)
            assert client.last_chunks == math.ceil(numel * 4 / MiB) == 140
            client.push_gradient(0, "perturbed", grad, 1.0, 0.5, {})
            assert client.last_chunks == 140
        got, meta = lt.wait(futs["perturbed"])
        assert meta["chunks"] == 140 and meta["bytes"] == 146_000_000
        assert hashlib.sha256(got.numpy().tobytes()).hexdigest() == \
            hashlib.sha256(grad.numpy().tobytes()).hexdigest()


NUMEL = 300_000  # 1.2 MB: two chunks
TOTAL = NUMEL * 4


def chunk(offset: int, data: bytes, *, total: int = TOTAL, dtype: str = "float32",
          shape: tuple[int, ...] = (NUMEL,)) -> tensor_pb2.TensorChunk:
    return tensor_pb2.TensorChunk(dtype=dtype, shape=list(shape), total_bytes=total,
                                  offset=offset, data=data)


def header(**kw: Any) -> ppb.GradientHeader:
    base: dict[str, Any] = {"run_id": RUN, "step": 3, "role": "perturbed", "dtype": "float32",
                            "shape": [NUMEL], "numel": NUMEL, "loss": 1.0, "accuracy": 0.5}
    return ppb.GradientHeader(**{**base, **kw})


def stream(grad: torch.Tensor, **header_kw: Any) -> list[ppb.GradientChunk]:
    chunks = list(tensor_chunks(grad))
    return [ppb.GradientChunk(header=header(**header_kw), chunk=chunks[0])] + \
        [ppb.GradientChunk(chunk=c) for c in chunks[1:]]


def bad_pushes(good: torch.Tensor) -> dict[str, tuple[SC, list[ppb.GradientChunk]]]:
    raw = bits(good)
    first, second = raw[:MiB], raw[MiB:]
    ok = stream(good)
    nan = good.clone()
    nan[NUMEL - 3] = float("nan")
    inf = good.clone()
    inf[10] = float("inf")
    H = ppb.GradientChunk
    return {
        "unknown run": (SC.NOT_FOUND, stream(good, run_id="other-run")),
        "unknown role": (SC.NOT_FOUND, stream(good, role="ascent")),
        "old step": (SC.FAILED_PRECONDITION, stream(good, step=2)),
        "future step": (SC.FAILED_PRECONDITION, stream(good, step=4)),
        "empty stream": (SC.INVALID_ARGUMENT, []),
        "missing header": (SC.INVALID_ARGUMENT, [H(chunk=m.chunk) for m in ok]),
        "header dtype": (SC.INVALID_ARGUMENT, stream(good, dtype="float64")),
        "header shape": (SC.INVALID_ARGUMENT, stream(good, shape=[NUMEL // 2, 2])),
        "header numel": (SC.INVALID_ARGUMENT, stream(good, numel=NUMEL - 1)),
        "chunk total length": (SC.INVALID_ARGUMENT,
                               [H(header=header(), chunk=chunk(0, first, total=TOTAL + 4))]),
        "chunk dtype": (SC.INVALID_ARGUMENT, [ok[0], H(chunk=chunk(MiB, second,
                                                                   dtype="float16"))]),
        "chunk shape": (SC.INVALID_ARGUMENT, [ok[0], H(chunk=chunk(MiB, second,
                                                                   shape=(NUMEL, 1)))]),
        "offset gap": (SC.INVALID_ARGUMENT, [ok[0], H(chunk=chunk(MiB + 4, second[4:]))]),
        "offset overlap": (SC.INVALID_ARGUMENT, [ok[0], H(chunk=chunk(MiB - 4, raw[MiB - 4:]))]),
        "first offset": (SC.INVALID_ARGUMENT, [H(header=header(), chunk=chunk(4, first))]),
        "oversized stream": (SC.INVALID_ARGUMENT, [*ok, H(chunk=chunk(TOTAL, b"\0" * 4))]),
        "truncated stream": (SC.INVALID_ARGUMENT, ok[:1]),
        "chunk over 1 MiB": (SC.INVALID_ARGUMENT,
                             [H(header=header(), chunk=chunk(0, raw[:MiB + 4096]))]),
        "message over 2 MiB": (SC.RESOURCE_EXHAUSTED,
                               [H(header=header(), chunk=chunk(0, raw[:TOTAL] + raw[:MiB]))]),
        "header repeated": (SC.INVALID_ARGUMENT, [ok[0], H(header=header(), chunk=ok[1].chunk)]),
        "message without chunk": (SC.INVALID_ARGUMENT, [ok[0], H(), ok[1]]),
        "empty chunk": (SC.INVALID_ARGUMENT, [ok[0], H(chunk=chunk(MiB, b"")), ok[1]]),
        "NaN gradient": (SC.INVALID_ARGUMENT, stream(nan)),
        "Inf gradient": (SC.INVALID_ARGUMENT, stream(inf)),
        "non-finite loss": (SC.INVALID_ARGUMENT, stream(good, loss=float("nan"))),
    }


def test_every_bad_push_gets_its_code_and_leaves_the_round_unchanged(lt: LoopThread) -> None:
    good = pattern(NUMEL, 11)
    with serving(lt, NUMEL) as (board, target, _):
        assert board is not None
        futs = lt.call(board.open_round, 3, {"perturbed": pattern(NUMEL, 12),
                                             "extrapolated": pattern(NUMEL, 13)})
        with grpc.insecure_channel(target) as ch:  # no client-side size limit
            stub = pgrpc.ParameterServiceStub(ch)
            for name, (code, msgs) in bad_pushes(good).items():
                with pytest.raises(grpc.RpcError) as info:
                    stub.PushGradient(iter(msgs), timeout=30)
                assert info.value.code() == code, (name, info.value.details())
                assert board.received == frozenset(), name
                assert not futs["perturbed"].done(), name
                assert board.step == 3 and board.roles == ("perturbed", "extrapolated")
            # the right gradient still goes through and resolves the future with itself
            reply = stub.PushGradient(iter(stream(good)), timeout=30)
            assert (reply.bytes, reply.chunks) == (TOTAL, 2)
            grad, meta = lt.wait(futs["perturbed"])
            assert bits(grad) == bits(good) and meta["loss"] == 1.0
            # a second gradient for the same role: ALREADY_EXISTS, the first one stays
            other = pattern(NUMEL, 14)
            with pytest.raises(grpc.RpcError) as info:
                stub.PushGradient(iter(stream(other)), timeout=30)
            assert info.value.code() == SC.ALREADY_EXISTS
            assert bits(board.buffer("perturbed")) == bits(good)
            assert board.received == {"perturbed"} and not futs["extrapolated"].done()
        # fetching: same checks, same codes
        with PointClient(target, RUN) as client:
            out = torch.empty(NUMEL)
            for step, role, code in [(3, "ascent", "NOT_FOUND"), (2, "extrapolated",
                                     "FAILED_PRECONDITION"), (3, "perturbed",
                                                              "FAILED_PRECONDITION")]:
                with pytest.raises(TransportError) as terr:
                    client.fetch_point(step, role, out)
                assert terr.value.code == code, terr.value
            with pytest.raises(TransportError, match="NOT_FOUND: unknown run"):
                PointClient(target, "nope").fetch_point(3, "extrapolated", out)
            with pytest.raises(CodecError, match="shape"):
                client.fetch_point(3, "extrapolated", torch.empty(NUMEL // 2, 2))
            client.fetch_point(3, "extrapolated", out)
            client.push_gradient(3, "extrapolated", good, 2.0, 0.0, {})
        assert lt.wait(futs["extrapolated"])[1]["loss"] == 2.0
        # a new round cancels nothing finished, reuses the buffers, and refuses the old step
        futs2 = lt.call(board.open_round, 4, {"perturbed": good})
        with PointClient(target, RUN) as client, pytest.raises(TransportError) as terr:
            client.push_gradient(3, "perturbed", good, 1.0, 0.0, {})
        assert terr.value.code == "FAILED_PRECONDITION" and not futs2["perturbed"].done()
        lt.call(board.close)
        assert futs2["perturbed"].cancelled()
        with PointClient(target, RUN) as client, pytest.raises(TransportError) as terr:
            client.fetch_point(4, "perturbed", torch.empty(NUMEL))
        assert terr.value.code == "FAILED_PRECONDITION"


def test_board_checks_points(lt: LoopThread) -> None:
    board = RoundBoard(RUN, 10)
    with pytest.raises(ValueError, match="expected 10"):
        lt.call(board.open_round, 0, {"perturbed": torch.zeros(9)})
    with pytest.raises(ValueError, match="expected 10"):
        lt.call(board.open_round, 0, {"perturbed": torch.zeros(10, dtype=torch.float64)})
    with pytest.raises(ValueError, match="at least one"):
        lt.call(board.open_round, 0, {})
    assert board.step is None


# -- health, reflection, token, TLS --------------------------------------------------------------
def test_health_and_reflection(lt: LoopThread) -> None:
    with serving(lt, 4, handler=object()) as (_, target, server), \
            grpc.insecure_channel(target) as ch:
        hstub = health_pb2_grpc.HealthStub(ch)
        for name in ("", PARAMETER_SERVICE, COORDINATOR_SERVICE):
            reply = hstub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
        rstub = reflection_pb2_grpc.ServerReflectionStub(ch)
        [resp] = list(rstub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
        names = {s.name for s in resp.list_services_response.service}
        assert {PARAMETER_SERVICE, COORDINATOR_SERVICE} <= names
        [resp] = list(rstub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="sampa.v1.GradientChunk")]), timeout=5))
        assert resp.file_descriptor_response.file_descriptor_proto
        lt.run(set_not_serving(server))
        for name in ("", PARAMETER_SERVICE, COORDINATOR_SERVICE):
            reply = hstub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING, name


def test_token(lt: LoopThread) -> None:
    with pytest.raises(ValueError, match="requires a token"):
        lt.run(start_server(RoundBoard(RUN, 4), None, host="0.0.0.0"))
    with pytest.raises(ValueError, match="requires a token"):
        lt.run(start_server(RoundBoard(RUN, 4), None, host="::"))
    token = "s3cret-token"
    with serving(lt, 4, handler=Handler(), token=token) as (board, target, _):
        assert board is not None
        futs = lt.call(board.open_round, 0, {"perturbed": torch.arange(4.0)})
        out = torch.empty(4)
        for bad in (None, "wrong", token + "x"):
            with PointClient(target, RUN, token=bad) as c, pytest.raises(TransportError) as e:
                c.fetch_point(0, "perturbed", out)
            assert e.value.code == "UNAUTHENTICATED"
            with PointClient(target, RUN, token=bad) as c, pytest.raises(TransportError) as e:
                c.push_gradient(0, "perturbed", torch.ones(4), 1.0, 1.0, {})
            assert e.value.code == "UNAUTHENTICATED"
            with pytest.raises(UserError, match="token"):
                control.get_status(target, token=bad)
        assert board.received == frozenset()
        with grpc.insecure_channel(target) as ch:  # health stays open
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                         timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            rstub = reflection_pb2_grpc.ServerReflectionStub(ch)
            with pytest.raises(grpc.RpcError) as info:
                list(rstub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
                    list_services="")]), timeout=5))
            assert info.value.code() == SC.UNAUTHENTICATED
        with PointClient(target, RUN, token=token) as c:
            c.fetch_point(0, "perturbed", out)
            c.push_gradient(0, "perturbed", torch.ones(4), 1.0, 1.0, {})
        assert torch.equal(out, torch.arange(4.0))
        assert torch.equal(lt.wait(futs["perturbed"])[0], torch.ones(4))
        assert control.get_status(target, token=token)["run_id"] == RUN


def test_tls_end_to_end(lt: LoopThread, tmp_path: Path) -> None:
    cert, key = (f.read_bytes() for f in self_signed(tmp_path))
    numel = 300_001
    with serving(lt, numel, handler=Handler(), tls=(cert, key), token="t") as (board, target, _):
        assert board is not None
        point, grad = pattern(numel, 21), pattern(numel, 22)
        futs = lt.call(board.open_round, 1, {"extrapolated": point})
        with PointClient(target, RUN, token="t", root_cert=cert) as c:
            out = torch.empty(numel)
            c.fetch_point(1, "extrapolated", out)
            c.push_gradient(1, "extrapolated", grad, 0.1, 0.9, {"compute": 1.0})
        assert bits(out) == bits(point)
        assert bits(lt.wait(futs["extrapolated"])[0]) == bits(grad)
        assert control.get_status(target, token="t", root_cert=cert)["run_id"] == RUN
        with PointClient(target, RUN, token="t", timeout=5) as plain, \
                pytest.raises(TransportError) as e:  # plaintext to a TLS port
            plain.fetch_point(1, "extrapolated", out)
        assert e.value.code == "UNAVAILABLE"
        other = self_signed(tmp_path / "other")[0].read_bytes()  # one the server does not hold
        with pytest.raises(UserError, match="cannot reach"):
            control.get_status(target, token="t", root_cert=other)


# -- the control plane ---------------------------------------------------------------------------
class Handler:
    """A small real coordinator stand-in."""

    def __init__(self) -> None:
        self.hub = ProgressHub()
        self.stopped = False
        self.checkpoints = 0

    def status(self) -> dict[str, Any]:
        return {"run_id": RUN, "algorithm": "sampa", "step": 12, "epoch": 1.5, "loss": 0.25,
                "accuracy": 0.875, "transport": "grpc", "metrics_port": 9100,
                "total_steps": 100, "state": "running", "round_age_seconds": 2.5,
                "stalled": True,
                "workers": [{"name": "perturbed", "state": "computing", "pid": 101,
                             "device": "cpu", "busy_seconds": 1.25},
                            {"name": "extrapolated", "state": "idle", "pid": 102,
                             "device": "cuda:0", "busy_seconds": 0.0}]}

    def progress(self) -> Any:
        return self.hub.subscribe()

    async def checkpoint(self) -> str:
        await asyncio.sleep(0)
        self.checkpoints += 1
        return f"/tmp/ckpt-{self.checkpoints}.pt"

    def stop(self) -> None:
        self.stopped = True


class Failing:
    def status(self) -> dict[str, Any]:
        raise RuntimeError("no run in progress\nsecond line")

    def checkpoint(self) -> str:
        raise OSError("disk full")


def test_control_plane(lt: LoopThread, capsys: pytest.CaptureFixture[str]) -> None:
    h = Handler()
    with serving(lt, None, handler=h) as (_, target, _server):
        st = control.get_status(target)
        assert st == h.status()
        assert lt.call(status_message, {"step": np.int64(3), "epoch": torch.tensor(0.5).item(),
                                        "loss": np.float32(0.5), "extra": 1}).step == 3
        assert control.request_checkpoint(target) == {"path": "/tmp/ckpt-1.pt"}
        assert not h.stopped
        got: list[dict[str, Any]] = []
        watcher = threading.Thread(target=lambda: got.extend(control.watch(target, 3)))
        watcher.start()
        deadline = time.time() + 10
        while h.hub.watchers == 0 and time.time() < deadline:
            time.sleep(0.01)
        assert h.hub.watchers == 1
        events = [{"kind": "round", "step": s, "total": 100, "loss": 1.0 / s, "round_s": 0.01,
                   "algo": "sampa", "comm_share": 0.1} for s in (1, 2)]
        events.append({"kind": "epoch", "step": 2, "epoch": 1.0, "test_accuracy": 0.5,
                       "lr": 0.1})
        for ev in events:
            lt.call(h.hub.publish, ev)
        watcher.join(10)
        assert [e["step"] for e in got] == [1, 2, 2]
        assert got[0]["round_seconds"] == 0.01 and got[0]["algorithm"] == "sampa"
        assert got[0]["test_accuracy"] is None and got[2]["test_accuracy"] == 0.5
        assert got[2]["kind"] == "epoch" and got[2]["lr"] == 0.1 and got[0]["time"] > 0
        deadline = time.time() + 10  # the watch ended on the server too
        while h.hub.watchers and time.time() < deadline:
            time.sleep(0.01)
        assert h.hub.watchers == 0
        # the run ending ends an open-ended watch
        got.clear()
        watcher = threading.Thread(target=lambda: got.extend(control.watch(target)))
        watcher.start()
        deadline = time.time() + 10
        while h.hub.watchers == 0 and time.time() < deadline:
            time.sleep(0.01)
        lt.call(h.hub.publish, {"kind": "done", "text": "finished"})
        lt.call(h.hub.close)
        watcher.join(10)
        assert not watcher.is_alive() and [e["kind"] for e in got] == ["done"]
        # the command-line handlers
        parser = argparse.ArgumentParser()
        add_control_commands(parser.add_subparsers(dest="command"))
        args = parser.parse_args(["status", "--target", target])
        assert args.func(args) == 0
        out = capsys.readouterr().out
        assert "run run-1  sampa  running  step 12/100" in out and "pid 102  cuda:0" in out
        args = parser.parse_args(["stop", "--target", target])
        assert args.func(args) == 0 and h.stopped
        assert control.request_stop(target) == {"accepted": True}
    with serving(lt, None, handler=Failing()) as (_, target, _server):
        with pytest.raises(UserError) as e:
            control.get_status(target)
        assert str(e.value) == f"target: {target} answered FAILED_PRECONDITION: status: no run " \
                               "in progress"
        with pytest.raises(UserError, match="INTERNAL: checkpoint: disk full"):
            control.request_checkpoint(target)
        with pytest.raises(UserError, match="UNIMPLEMENTED"):
            control.request_stop(target)
        with pytest.raises(UserError, match="UNIMPLEMENTED"):
            list(control.watch(target, 1))


def test_control_unreachable_and_bad_target() -> None:
    port = free_port()
    for fn in (control.get_status, control.request_stop,
               lambda t: list(control.watch(t, 1))):
        with pytest.raises(UserError) as e:
            fn(f"127.0.0.1:{port}")
        assert str(e.value) == f"target: cannot reach 127.0.0.1:{port} (connection refused)"
    for bad in ("nohost", "127.0.0.1:", "127.0.0.1:99999", "a b:1", ""):
        with pytest.raises(UserError, match="expected HOST:PORT"):
            control.get_status(bad)
    parser = argparse.ArgumentParser()
    add_control_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["status", "--target", f"127.0.0.1:{port}", "--token-file",
                              "/nonexistent/token"])
    with pytest.raises(UserError, match="token-file: cannot read /nonexistent/token"):
        args.func(args)


def test_concurrent_pushes_for_one_role_one_wins_intact(lt: LoopThread) -> None:
    numel = 2_000_000  # 8 MB: 8 chunks each, so the two streams interleave
    with serving(lt, numel) as (board, target, _):
        assert board is not None
        clients = [PointClient(target, RUN) for _ in range(2)]
        grads = [pattern(numel, 31), pattern(numel, 32)]

        def push(i: int) -> str:
            try:
                clients[i].push_gradient(0, "perturbed", grads[i], float(i), 0.0, {})
                return "OK"
            except TransportError as err:
                return err.code

        for _ in range(3):
            futs = lt.call(board.open_round, 0, {"perturbed": torch.zeros(numel)})
            with ThreadPoolExecutor(2) as pool:
                codes = [f.result(60) for f in [pool.submit(push, i) for i in range(2)]]
            assert sorted(codes) == ["ALREADY_EXISTS", "OK"]
            grad, meta = lt.wait(futs["perturbed"])
            winner = codes.index("OK")
            assert meta["loss"] == float(winner) and bits(grad) == bits(grads[winner])
        for c in clients:
            c.close()


def test_push_in_flight_when_the_round_moves_on(lt: LoopThread) -> None:
    good = pattern(NUMEL, 41)
    with serving(lt, NUMEL) as (board, target, _):
        assert board is not None
        futs = lt.call(board.open_round, 3, {"perturbed": good})
        gate = threading.Event()

        def slow() -> Iterator[ppb.GradientChunk]:
            msgs = stream(good)
            yield msgs[0]
            gate.wait(30)
            yield from msgs[1:]

        with grpc.insecure_channel(target) as ch:
            stub = pgrpc.ParameterServiceStub(ch)
            call = stub.PushGradient.future(slow(), timeout=30)
            deadline = time.time() + 10
            while not board.lock("perturbed").locked() and time.time() < deadline:
                time.sleep(0.005)
            assert board.lock("perturbed").locked()  # the first chunk is in the buffer
            futs2 = lt.call(board.open_round, 4, {"perturbed": good})
            assert futs["perturbed"].cancelled()
            gate.set()
            with pytest.raises(grpc.RpcError) as info:
                call.result(30)
            assert info.value.code() == SC.FAILED_PRECONDITION
            assert "moved on" in info.value.details()
            assert not futs2["perturbed"].done() and board.received == frozenset()
            stub.PushGradient(iter(stream(good, step=4)), timeout=30)
        assert bits(lt.wait(futs2["perturbed"])[0]) == bits(good)


def test_busy_port_and_worker_errors_travel(lt: LoopThread) -> None:
    with serving(lt, 4) as (_, target, _server):
        port = int(target.rsplit(":", 1)[1])
        with pytest.raises(UserError, match=f"port: cannot bind 127.0.0.1:{port}"):
            lt.run(start_server(RoundBoard(RUN, 4), None, port=port))
    err = pickle.loads(pickle.dumps(TransportError("FetchPoint: NOT_FOUND: x", "NOT_FOUND")))
    assert (str(err), err.code) == ("FetchPoint: NOT_FOUND: x", "NOT_FOUND")
