"""Fuzz of the gRPC control plane on a real server on loopback, and of a server with a token.

Random and malformed requests to GetStatus, Checkpoint, Stop and WatchProgress (random bytes,
odd ``max_events``), calls to methods and services that do not exist on either plane, and calls
without the right token each get their exact status code; Checkpoint and Stop are never called,
and the server still answers health SERVING. Generation is derandomized, so every run sends the
same messages.
"""

from __future__ import annotations

import string
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import torch
from conftest import LoopThread
from google.protobuf.message import DecodeError
from grpc_fuzz import (
    CONTROL,
    FETCH,
    FUZZ,
    MIN_SENT,
    NUMEL,
    OK,
    OPEN,
    PUSH,
    REAL_METHODS,
    RUN,
    SC,
    SENT,
    SERVING,
    STEP,
    UNDECODABLE,
    DataPlane,
    check_code,
    data_plane,
    gradient,
    health_status,
    push_raw,
    ser,
    stream,
    unary_raw,
    unary_stream_raw,
)
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from sampa_ray.proto.sampa.v1 import coordinator_service_pb2 as cpb
from sampa_ray.transport.grpc.client import get_status
from sampa_ray.transport.grpc.control_plane import (
    COORDINATOR_SERVICE,
    event_message,
    status_message,
)
from sampa_ray.transport.grpc.data_plane import PARAMETER_SERVICE, RoundBoard
from sampa_ray.transport.grpc.server import start_server, stop_server

# -- the control plane ---------------------------------------------------------------------------
STATUS = {"run_id": RUN, "algorithm": "sampa", "step": 12, "epoch": 1.5, "loss": 0.25,
          "accuracy": 0.875, "transport": "grpc", "metrics_port": 9100, "total_steps": 100,
          "state": "running",
          "workers": [{"name": OPEN, "state": "computing", "pid": 101, "device": "cpu"}]}
EVENTS = [{"kind": "round", "step": 1, "total": 100, "loss": 1.5, "round_s": 0.01,
           "algo": "sampa", "time": 1.7e9},
          {"kind": "epoch", "step": 44, "epoch": 1.0, "test_accuracy": 0.5, "lr": 0.1,
           "time": 1.7e9 + 1},
          {"kind": "done", "text": "finished", "time": 1.7e9 + 2}]


class Handler:
    """A coordinator stand-in that records every call made into it."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.open_watches = 0

    def status(self) -> dict[str, Any]:
        self.calls["status"] += 1
        return STATUS

    def progress(self) -> Any:
        self.calls["progress"] += 1

        async def events() -> Any:
            self.open_watches += 1
            try:
                for ev in EVENTS:
                    yield dict(ev)
            finally:
                self.open_watches -= 1
        return events()

    def checkpoint(self) -> str:
        self.calls["checkpoint"] += 1
        return "/tmp/never.pt"

    def stop(self) -> None:
        self.calls["stop"] += 1


@dataclass
class ControlPlane:
    lt: LoopThread
    handler: Handler
    target: str
    channel: grpc.Channel
    decoded_status: int = 0
    decoded_watch: int = 0


@pytest.fixture(scope="module")
def control_plane(lt: LoopThread) -> Iterator[ControlPlane]:
    handler = Handler()
    server, port = lt.run(start_server(None, handler))
    target = f"127.0.0.1:{port}"
    ch = grpc.insecure_channel(target)
    try:
        yield ControlPlane(lt, handler, target, ch)
    finally:
        ch.close()
        lt.run(stop_server(server, 0))


@pytest.fixture(scope="module")
def plane(lt: LoopThread) -> Iterator[DataPlane]:
    """The data plane, for the calls to unknown methods on both servers."""
    yield from data_plane(lt)


def decodes(cls: Any, raw: bytes) -> bool:
    try:
        cls.FromString(raw)
    except DecodeError:
        return False
    return True


REQUESTS = {"GetStatus": cpb.StatusRequest, "Checkpoint": cpb.CheckpointRequest,
            "Stop": cpb.StopRequest}


def test_control_unary_random_bytes(control_plane: ControlPlane) -> None:
    """Random bytes to GetStatus (any: decoded ones get the status), Checkpoint and Stop (only
    undecodable ones, so the run is never stopped or checkpointed): exact codes; Checkpoint and
    Stop are never called."""
    cp = control_plane

    @settings(FUZZ, max_examples=MIN_SENT["control_unary"])
    @given(method=st.sampled_from(list(REQUESTS)), raw=st.binary(max_size=48),
           spoil=st.sampled_from([b"", b"\x00", b"\x07", b"\x0f", b"\x0a\x05ab", b"\x80"]))
    @example(method="GetStatus", raw=b"", spoil=b"")
    @example(method="Stop", raw=b"", spoil=b"\x00")
    def run(method: str, raw: bytes, spoil: bytes) -> None:
        raw = raw + spoil
        ok = decodes(REQUESTS[method], raw)
        if method != "GetStatus":
            assume(not ok)
        got = unary_raw(cp.channel, CONTROL[method], raw)
        SENT["control_unary"] += 1
        if ok:
            cp.decoded_status += 1
            check_code(got, OK, "valid", (method, raw))
            assert cpb.StatusReply.FromString(got[2]) == status_message(STATUS)
        else:
            check_code(got, UNDECODABLE, "undecodable", (method, raw))

    run()
    assert cp.handler.calls == Counter({"status": cp.decoded_status})
    assert SENT["control_unary"] >= MIN_SENT["control_unary"]


def varint(v: int) -> bytes:
    v &= (1 << 64) - 1
    out = bytearray()
    while True:
        b, v = v & 0x7F, v >> 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


watch_fields = st.one_of(
    st.builds(lambda v: b"\x08" + varint(v), st.one_of(
        st.sampled_from([0, 1, 2, 3, 4, 2**31, 2**32 - 1, 2**32, 2**32 + 1, -1, -(2**63)]),
        st.integers(-(2**63), 2**64 - 1))),
    st.builds(lambda b: b"\x09" + b, st.binary(min_size=8, max_size=8)),  # field 1 as fixed64
    st.builds(lambda b: b"\x0d" + b, st.binary(min_size=4, max_size=4)),  # as fixed32
    st.builds(lambda b: b"\x0a" + bytes([len(b)]) + b, st.binary(max_size=8)),  # as bytes
    st.builds(lambda v: b"\x10" + varint(v), st.integers(0, 2**64 - 1)),  # unknown field 2
    st.binary(max_size=12),
)


def test_watch_progress_odd_max_events(control_plane: ControlPlane) -> None:
    """WatchProgress with odd max_events (0, huge, 64-bit and negative varints, wrong wire
    types, repeated fields, unknown fields, trailing junk): undecodable ones get their code,
    decoded ones exactly min(max_events or all, 3) events, and every watch is closed."""
    cp = control_plane
    events = [event_message(ev) for ev in EVENTS]

    @settings(FUZZ, max_examples=MIN_SENT["control_watch"])
    @given(parts=st.lists(watch_fields, max_size=3))
    @example(parts=[])
    @example(parts=[b"\x08" + varint(2)])
    @example(parts=[b"\x08" + varint(-1)])
    @example(parts=[b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"])  # 11-byte varint
    def run(parts: list[bytes]) -> None:
        raw = b"".join(parts)
        got = unary_stream_raw(cp.channel, CONTROL["WatchProgress"], raw)
        SENT["control_watch"] += 1
        if not decodes(cpb.WatchRequest, raw):
            check_code(got, UNDECODABLE, "undecodable", raw)
            return
        cp.decoded_watch += 1
        m = cpb.WatchRequest.FromString(raw).max_events
        check_code(got, OK, f"max_events {m}", raw)
        n = min(m, len(events)) if m else len(events)
        assert [cpb.ProgressEvent.FromString(b) for b in got[2]] == events[:n], (raw, m)

    run()
    deadline = time.time() + 10
    while cp.lt.call(lambda: cp.handler.open_watches) and time.time() < deadline:
        time.sleep(0.01)
    assert cp.lt.call(lambda: cp.handler.open_watches) == 0
    assert cp.handler.calls["progress"] == cp.decoded_watch
    assert SENT["control_watch"] >= MIN_SENT["control_watch"]


def test_unknown_methods_and_services(control_plane: ControlPlane, plane: DataPlane) -> None:
    """Calls to methods and services that do not exist, on both servers: UNIMPLEMENTED."""
    name = st.text(string.ascii_letters + string.digits + "_", min_size=1, max_size=24)
    services = st.one_of(st.sampled_from([COORDINATOR_SERVICE, PARAMETER_SERVICE,
                                          "sampa.v1.coordinatorservice", "sampa.v2.Parameter"
                                          "Service", "grpc.health.v1.Health", "sampa.v1"]), name)

    @settings(FUZZ, max_examples=MIN_SENT["unknown_method"])
    @given(service=services, method=st.one_of(name, st.sampled_from(
        ["getStatus", "Fetchpoint", "PushGradients", "Check_", "Stop2"])),
        raw=st.binary(max_size=16), which=st.booleans())
    def run(service: str, method: str, raw: bytes, which: bool) -> None:
        path = f"/{service}/{method}"
        assume(path not in REAL_METHODS and path not in (
            "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
            "/grpc.health.v1.Health/List"))
        ch = control_plane.channel if which else plane.channel
        got = unary_raw(ch, path, raw)
        SENT["unknown_method"] += 1
        check_code(got, SC.UNIMPLEMENTED, "no such method", path)

    run()
    assert SENT["unknown_method"] >= MIN_SENT["unknown_method"]


def test_control_plane_unchanged_and_still_serving(control_plane: ControlPlane) -> None:
    cp = control_plane
    for service in ("", COORDINATOR_SERVICE):
        assert health_status(cp.target, service) == SERVING
    assert cp.handler.calls["stop"] == 0 and cp.handler.calls["checkpoint"] == 0
    assert cp.lt.call(lambda: cp.handler.open_watches) == 0
    assert get_status(cp.target)["run_id"] == RUN


TOKEN = "fuzz-token-0123"
token_chars = string.ascii_letters + string.digits + "-._~+/="
auth_values = st.one_of(
    st.none(),
    st.text(token_chars, max_size=30).map(lambda s: ("authorization", s)),
    st.text(token_chars, max_size=30).map(lambda s: ("authorization", f"Bearer {s}")),
    st.sampled_from([("authorization", v) for v in (
        f"bearer {TOKEN}", TOKEN, f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", f"Basic {TOKEN}",
        f"Bearer{TOKEN}", f"Bearer  {TOKEN}")] + [("x-token", TOKEN)]),
)


def test_token_server_refuses_every_call_without_the_token(lt: LoopThread) -> None:
    """With a token, every call but the health checks without ``Bearer <token>`` is
    UNAUTHENTICATED, whatever its payload (decodable or not, on either plane), and reaches
    neither the board nor the handler."""
    board = RoundBoard(RUN, NUMEL)
    futs = lt.call(board.open_round, STEP, {OPEN: torch.from_numpy(gradient(5))})
    handler = Handler()
    server, port = lt.run(start_server(board, handler, token=TOKEN))
    target = f"127.0.0.1:{port}"
    paths = [FETCH, PUSH, *CONTROL.values()]
    good = ser(stream(gradient(6).tobytes(), [100]))
    try:
        with grpc.insecure_channel(target) as ch:
            @settings(FUZZ, max_examples=MIN_SENT["token"])
            @given(path=st.sampled_from(paths), auth=auth_values,
                   raw=st.one_of(st.binary(max_size=32), st.sampled_from([b"", good[0]])))
            @example(path=CONTROL["Stop"], auth=None, raw=b"\xff\xff")
            @example(path=CONTROL["GetStatus"], auth=("authorization", "Bearer x"), raw=b"\x07")
            @example(path=FETCH, auth=None, raw=b"\xff\xff")
            @example(path=PUSH, auth=None, raw=good[0])
            def run(path: str, auth: tuple[str, str] | None, raw: bytes) -> None:
                assume(auth != ("authorization", f"Bearer {TOKEN}"))
                md = (auth,) if auth is not None else None
                if path == PUSH:
                    got = push_raw(ch, [raw, *good[1:]], metadata=md)
                elif path in (FETCH, CONTROL["WatchProgress"]):
                    got = unary_stream_raw(ch, path, raw, metadata=md)
                else:
                    got = unary_raw(ch, path, raw, metadata=md)
                SENT["token"] += 1
                check_code(got, SC.UNAUTHENTICATED, "no valid token", (path, auth, raw))

            run()
        assert health_status(target) == SERVING
        assert handler.calls == Counter() and board.received == frozenset()
        assert not futs[OPEN].done()
        assert get_status(target, token=TOKEN)["run_id"] == RUN
    finally:
        lt.run(stop_server(server, 0))
    assert SENT["token"] >= MIN_SENT["token"]

