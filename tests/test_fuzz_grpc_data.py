"""Fuzz of the gRPC data plane on a real server on loopback.

Thousands of generated malformed pushes and fetches (random bytes, wrong dtypes, shapes and
lengths, bad offsets, empty and oversized chunks and messages, out-of-order and duplicated chunks
and steps, unknown roles and runs, non-finite values) each get their exact status code; after
every one the round, the points and the received gradient are exactly as before, and at the end
the server still answers health SERVING and a correct push lands intact.

Expected codes come from a reference model of the documented validation order (the table in
``sampa_ray/transport/grpc/data_plane.py``), applied to the very bytes sent: the first message that
the server reads and finds wrong decides the code. Generation is derandomized, so every run sends
the same messages.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import LoopThread
from google.protobuf.message import DecodeError
from grpc_fuzz import (
    AE,
    DONE,
    FETCH,
    FP,
    FUZZ,
    IA,
    MIN_SENT,
    NBYTES,
    NEAR_DTYPES,
    NEAR_ROLES,
    NF,
    NUMEL,
    OK,
    OPEN,
    PUSH,
    RE,
    ROLES,
    RUN,
    SC,
    SENT,
    SERVING,
    STEP,
    U64_MAX,
    UNDECODABLE,
    DataPlane,
    MiB,
    View,
    bits,
    check_code,
    data_plane,
    gradient,
    header,
    health_status,
    push_raw,
    ser,
    stream,
    tchunk,
    unary_stream_raw,
)
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from sampa_ray.proto.sampa.v1 import parameter_service_pb2 as ppb
from sampa_ray.proto.sampa.v1 import tensor_pb2
from sampa_ray.transport.codec import DTYPES, MAX_CHUNK_BYTES, MAX_MESSAGE_BYTES
from sampa_ray.transport.grpc.data_plane import PARAMETER_SERVICE


def test_the_planned_messages_add_up_to_over_a_thousand() -> None:
    assert sum(MIN_SENT.values()) >= 1000


@pytest.fixture(scope="module")
def plane(lt: LoopThread) -> Iterator[DataPlane]:
    yield from data_plane(lt)


# -- the reference model of the board's validation -----------------------------------------------
def expect_round(run_id: str, step: int, role: str,
                 v: View) -> tuple[grpc.StatusCode, str] | None:
    """What the server answers to a message naming a run, step and role that is not the open
    round's (None: it is)."""
    if run_id != v.run_id:
        return NF, "unknown run"
    if v.step is None or step != v.step:
        return FP, "not the current step"
    if role not in v.roles:
        return NF, "unknown role"
    return None


def expect_push(msgs: list[bytes], v: View) -> tuple[grpc.StatusCode, str]:
    """The code the documented validation gives a PushGradient stream of these raw messages."""
    if not msgs:
        return IA, "empty stream"
    buf = bytearray(v.nbytes)
    off = taken = 0
    for i, raw in enumerate(msgs, 1):
        if len(raw) > MAX_MESSAGE_BYTES:  # gRPC's own limit, checked as the message is read
            return RE, f"message {i} over the limit"
        try:
            m = ppb.GradientChunk.FromString(raw)
        except DecodeError:
            return UNDECODABLE, "undecodable"
        if i == 1:
            if not m.HasField("header"):
                return IA, "no header"
            h = m.header
            refused = expect_round(h.run_id, h.step, h.role, v)
            if refused is not None:
                return refused
            if h.dtype != "float32" or list(h.shape) != [v.numel] or h.numel != v.numel:
                return IA, "header dtype/shape/numel"
            if not math.isfinite(h.loss):
                return IA, "non-finite loss"
            if h.role in v.received:
                return AE, "already received"
        elif m.HasField("header"):
            return IA, f"message {i} repeats the header"
        if not m.HasField("chunk"):
            return IA, f"message {i} without chunk"
        c = m.chunk
        if c.dtype != "float32" or list(c.shape) != [v.numel] or c.total_bytes != v.nbytes:
            return IA, f"chunk {i} dtype/shape/total"
        n = len(c.data)
        if i > 1 and off == v.nbytes:  # every earlier message added a chunk
            return IA, "past the end"
        if c.offset != off:
            return IA, f"chunk {i} offset {c.offset}, expected {off}"
        if n > MAX_CHUNK_BYTES:
            return IA, f"chunk {i} over 1 MiB"
        if n == 0 and v.nbytes:
            return IA, f"chunk {i} empty"
        if off + n > v.nbytes:
            return IA, "past the end"
        buf[off:off + n] = c.data
        off += n
        end = off // 4
        if not np.isfinite(np.frombuffer(bytes(buf), dtype="<f4")[taken:end]).all():
            return IA, "non-finite value"
        taken = end
    if off != v.nbytes:
        return IA, "ended early"
    return OK, "valid"


def expect_fetch(raw: bytes, v: View) -> tuple[grpc.StatusCode, str]:
    try:
        r = ppb.PointRequest.FromString(raw)
    except DecodeError:
        return UNDECODABLE, "undecodable"
    refused = expect_round(r.run_id, r.step, r.role, v)
    if refused is not None:
        return refused
    if r.role in v.received:
        return FP, "already received"
    return OK, "valid"


def send_push(dp: DataPlane, key: str, msgs: list[bytes], what: Any = None) -> grpc.StatusCode:
    """Send one malformed push, check its exact code against the model and the round after."""
    want, reason = expect_push(msgs, dp.view())
    assert want != OK, "a valid push must not be sent by the fuzzer"
    got = push_raw(dp.channel, msgs)
    SENT[key] += 1
    check_code(got, want, reason, what if what is not None else msgs[:3])
    dp.invariant()
    return want


# -- strategies ----------------------------------------------------------------------------------
seeds = st.integers(0, 2**32 - 1)
cut_lists = st.lists(st.integers(1, NBYTES - 1), max_size=6, unique=True).map(sorted)
int64 = st.integers(-(2**63), 2**63 - 1)
uint64 = st.integers(0, 2**64 - 1)
texts = st.text(max_size=24)
steps = st.one_of(st.just(STEP), int64, st.sampled_from([STEP - 1, STEP + 1, 0, -STEP, 2**62]))
roles = st.one_of(st.sampled_from(ROLES), st.sampled_from(NEAR_ROLES), texts)
runs = st.one_of(st.just(RUN), st.sampled_from(["", RUN.upper(), RUN + " ", "fuzz-run-2"]),
                 texts)


@st.composite
def fuzzed_headers(draw: st.DrawFn) -> ppb.GradientHeader:
    return header(
        run_id=draw(runs), step=draw(steps), role=draw(roles),
        dtype=draw(st.one_of(st.just("float32"), st.sampled_from([*DTYPES, *NEAR_DTYPES]),
                             texts)),
        shape=draw(st.one_of(st.just([NUMEL]), st.sampled_from(
            [[], [NUMEL, 1], [1, NUMEL], [NUMEL - 1], [NUMEL + 1], [-NUMEL], [0], [NUMEL] * 2]),
            st.lists(int64, max_size=4))),
        numel=draw(st.one_of(st.just(NUMEL), st.sampled_from([0, NUMEL - 1, NUMEL + 1, NBYTES,
                                                               2**64 - 1]), uint64)),
        loss=draw(st.one_of(st.just(0.5), st.floats())),
        accuracy=draw(st.floats()),
        timings=draw(st.dictionaries(texts, st.floats(), max_size=3)))


def test_push_random_bytes(plane: DataPlane) -> None:
    """Random bytes as the messages of a push, alone or after a well-formed first message."""
    good = ser(stream(gradient(1).tobytes(), [400]))

    @settings(FUZZ, max_examples=MIN_SENT["push_bytes"])
    @given(junk=st.lists(st.binary(max_size=64), max_size=4), keep=st.integers(0, 2))
    @example(junk=[], keep=0)
    @example(junk=[b"\xff\xff\xff"], keep=0)
    @example(junk=[b"\x0a\x80"], keep=1)
    def run(junk: list[bytes], keep: int) -> None:
        msgs = good[:keep] + junk
        assume(expect_push(msgs, plane.view())[0] != OK)
        send_push(plane, "push_bytes", msgs)

    run()
    assert SENT["push_bytes"] >= MIN_SENT["push_bytes"]


def test_push_header_fields(plane: DataPlane) -> None:
    """Unknown runs and roles, stale, future and random steps, wrong dtypes, shapes and numel,
    non-finite losses, a push for a role already received, a missing header; the chunks that
    follow are well formed."""
    @settings(FUZZ, max_examples=MIN_SENT["push_header"])
    @given(head=fuzzed_headers(), seed=seeds, cuts=cut_lists, drop=st.booleans())
    @example(head=header(role=DONE), seed=0, cuts=[], drop=False)
    @example(head=header(step=STEP - 1), seed=0, cuts=[], drop=False)
    @example(head=header(step=STEP + 1), seed=0, cuts=[], drop=False)
    @example(head=header(role="ascent"), seed=0, cuts=[], drop=False)
    @example(head=header(run_id="other"), seed=0, cuts=[], drop=False)
    @example(head=header(loss=float("nan")), seed=0, cuts=[], drop=False)
    @example(head=header(), seed=0, cuts=[], drop=True)
    def run(head: ppb.GradientHeader, seed: int, cuts: list[int], drop: bool) -> None:
        msgs = stream(gradient(seed).tobytes(), cuts, head)
        if drop:
            msgs[0].ClearField("header")
        raw = ser(msgs)
        assume(expect_push(raw, plane.view())[0] != OK)
        send_push(plane, "push_header", raw, head)

    run()
    assert SENT["push_header"] >= MIN_SENT["push_header"]


# one change to a well-formed stream: (operation, index, value)
framing_ops = st.one_of(
    st.tuples(st.just("swap"), st.integers(0, 63), st.integers(0, 63)),
    st.tuples(st.just("swap_chunks"), st.integers(0, 63), st.integers(0, 63)),
    st.tuples(st.just("duplicate"), st.integers(0, 63), st.none()),
    st.tuples(st.just("drop"), st.integers(0, 63), st.none()),
    st.tuples(st.just("empty"), st.integers(0, 63), st.none()),
    st.tuples(st.just("shift"), st.integers(0, 63), st.integers(-8, 8)),
    st.tuples(st.just("offset"), st.integers(0, 63), uint64),
    st.tuples(st.just("dtype"), st.integers(0, 63),
              st.one_of(st.sampled_from([*DTYPES, *NEAR_DTYPES]), texts)),
    st.tuples(st.just("shape"), st.integers(0, 63), st.lists(int64, max_size=3)),
    st.tuples(st.just("total"), st.integers(0, 63),
              st.one_of(st.sampled_from([0, NBYTES - 4, NBYTES + 4, NBYTES * 2]), uint64)),
    st.tuples(st.just("no_chunk"), st.integers(0, 63), st.none()),
    st.tuples(st.just("repeat_header"), st.integers(0, 63), st.none()),
    st.tuples(st.just("no_header"), st.none(), st.none()),
    st.tuples(st.just("extra"), st.none(), st.integers(0, 4096)),
    st.tuples(st.just("cut_tail"), st.none(), st.integers(1, 64)),
    st.tuples(st.just("data"), st.integers(0, 63), st.binary(max_size=1200)),
    st.tuples(st.just("one_byte_chunks"), st.none(), st.integers(1, 7)),
)


def apply_framing(msgs: list[ppb.GradientChunk], op: tuple[str, Any, Any]
                  ) -> list[ppb.GradientChunk]:
    kind, i, v = op
    out = [ppb.GradientChunk.FromString(m.SerializeToString()) for m in msgs]
    if not out and kind not in ("extra",):
        return out
    if i is not None:
        i %= len(out)
    if kind == "swap":
        j = v % len(out)
        out[i], out[j] = out[j], out[i]
    elif kind == "swap_chunks":
        j = v % len(out)
        ci, cj = tensor_pb2.TensorChunk(), tensor_pb2.TensorChunk()
        ci.CopyFrom(out[i].chunk)
        cj.CopyFrom(out[j].chunk)
        out[i].chunk.CopyFrom(cj)
        out[j].chunk.CopyFrom(ci)
    elif kind == "duplicate":
        out.insert(i + 1, ppb.GradientChunk(chunk=out[i].chunk))
    elif kind == "drop":
        del out[i]
    elif kind == "empty":
        # right after chunk i (offsets are uint64: one already at the top stays there)
        after = min(out[i].chunk.offset + len(out[i].chunk.data), U64_MAX)
        out.insert(i + 1, ppb.GradientChunk(chunk=tchunk(after, b"")))
    elif kind == "shift":
        out[i].chunk.offset = min(max(0, out[i].chunk.offset + v), U64_MAX)
    elif kind == "offset":
        out[i].chunk.offset = v
    elif kind == "dtype":
        out[i].chunk.dtype = v
    elif kind == "shape":
        del out[i].chunk.shape[:]
        out[i].chunk.shape.extend(v)
    elif kind == "total":
        out[i].chunk.total_bytes = v
    elif kind == "no_chunk":
        out[i].ClearField("chunk")
    elif kind == "repeat_header":
        out[i].header.CopyFrom(header())
    elif kind == "no_header":
        out[0].ClearField("header")
    elif kind == "extra":  # an oversized stream: bytes past the end of the tensor
        out.append(ppb.GradientChunk(chunk=tchunk(NBYTES, b"\0" * v)))
    elif kind == "cut_tail":  # the stream ends early
        last = out[-1].chunk
        last.data = last.data[:max(0, len(last.data) - v)]
    elif kind == "data":
        out[i].chunk.data = v
    elif kind == "one_byte_chunks":  # many tiny chunks, then one too many
        out = stream(b"".join(m.chunk.data for m in out)[:NBYTES], list(range(v, NBYTES, v)))
        out.append(ppb.GradientChunk(chunk=tchunk(NBYTES, b"\1")))
    return out


def test_push_chunk_framing(plane: DataPlane) -> None:
    """Out-of-order, duplicated, dropped, empty and extra chunks; wrong offsets, dtypes, shapes
    and total lengths in chunks; messages without a chunk or repeating the header; streams
    ending early or running past the end."""
    @settings(FUZZ, max_examples=MIN_SENT["push_framing"])
    @given(seed=seeds, cuts=cut_lists, role=st.sampled_from(ROLES),
           ops=st.lists(framing_ops, min_size=1, max_size=3))
    @example(seed=0, cuts=[500], role=OPEN, ops=[("swap_chunks", 0, 1)])
    @example(seed=0, cuts=[500], role=OPEN, ops=[("duplicate", 1, None)])
    @example(seed=0, cuts=[500], role=OPEN, ops=[("extra", None, 4)])
    @example(seed=0, cuts=[500], role=OPEN, ops=[("drop", 1, None)])
    @example(seed=0, cuts=[500], role=OPEN, ops=[("empty", 0, None)])
    def run(seed: int, cuts: list[int], role: str, ops: list[tuple[str, Any, Any]]) -> None:
        msgs = stream(gradient(seed).tobytes(), cuts, header(role=role))
        for op in ops:
            msgs = apply_framing(msgs, op)
        raw = ser(msgs)
        assume(expect_push(raw, plane.view())[0] != OK)
        send_push(plane, "push_framing", raw, ops)

    run()
    assert SENT["push_framing"] >= MIN_SENT["push_framing"]


NONFINITE = [0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FFFFFFF, 0xFFFFFFFF,  # NaNs
             0x7F800000, 0xFF800000]  # +Inf, -Inf


def test_push_nonfinite_values(plane: DataPlane) -> None:
    """NaN (quiet, signalling, any payload) and +-Inf anywhere in the gradient, in chunks cut at
    any byte (an element may straddle two chunks), or a non-finite loss: INVALID_ARGUMENT."""
    @settings(FUZZ, max_examples=MIN_SENT["push_nonfinite"])
    @given(seed=seeds, cuts=cut_lists,
           bad=st.lists(st.tuples(st.integers(0, NUMEL - 1), st.sampled_from(NONFINITE)),
                        max_size=3),
           loss=st.one_of(st.just(0.25), st.sampled_from([math.nan, math.inf, -math.inf])))
    @example(seed=0, cuts=[], bad=[(NUMEL - 1, 0x7FC00000)], loss=0.25)
    @example(seed=0, cuts=[2, 999], bad=[(0, 0x7F800000)], loss=0.25)
    def run(seed: int, cuts: list[int], bad: list[tuple[int, int]], loss: float) -> None:
        assume(bad or not math.isfinite(loss))
        g = gradient(seed)
        u = g.view("<u4")
        for at, pattern in bad:
            u[at] = pattern
        raw = ser(stream(g.tobytes(), cuts, header(loss=loss)))
        assert expect_push(raw, plane.view())[0] == IA
        send_push(plane, "push_nonfinite", raw, (bad, loss, cuts))

    run()
    assert SENT["push_nonfinite"] >= MIN_SENT["push_nonfinite"]


byte_ops = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 63), st.one_of(st.integers(0, 80),
                                                             st.integers(0, 4000)),
              st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(0, 63), st.integers(0, 80), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 63), st.integers(0, 200), st.none()),
    st.tuples(st.just("insert"), st.integers(0, 63), st.integers(0, 80),
              st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("replace"), st.integers(0, 63), st.none(), st.binary(max_size=32)),
    st.tuples(st.just("drop"), st.integers(0, 63), st.none(), st.none()),
    st.tuples(st.just("append"), st.none(), st.none(), st.binary(max_size=32)),
)


def apply_bytes(msgs: list[bytes], op: tuple[str, Any, Any, Any]) -> list[bytes]:
    kind, i, pos, v = op
    out = list(msgs)
    if kind == "append" or not out:
        return [*out, v if kind == "append" else b""]
    i %= len(out)
    m = bytearray(out[i])
    if kind in ("flip", "set", "insert") and not m:
        m = bytearray(b"\0")
    if kind == "flip":
        m[pos % len(m)] ^= 1 << v
    elif kind == "set":
        m[pos % len(m)] = v
    elif kind == "truncate":
        del m[min(pos, len(m)):]
    elif kind == "insert":
        m[pos % (len(m) + 1):pos % (len(m) + 1)] = v
    elif kind == "replace":
        m = bytearray(v)
    elif kind == "drop":
        del out[i]
        return out
    out[i] = bytes(m)
    return out


def test_push_mutated_bytes(plane: DataPlane) -> None:
    """Well-formed streams with bytes flipped, set, cut, inserted or replaced on the wire; the
    model decides what each mutant is (undecodable, or decoded and wrong somewhere)."""
    @settings(FUZZ, max_examples=MIN_SENT["push_mutated"])
    @given(seed=seeds, cuts=st.lists(st.integers(1, NBYTES - 1), min_size=3, max_size=9,
                                     unique=True).map(sorted),
           role=st.sampled_from(ROLES), ops=st.lists(byte_ops, min_size=1, max_size=4))
    def run(seed: int, cuts: list[int], role: str, ops: list[tuple[str, Any, Any, Any]]
            ) -> None:
        raw = ser(stream(gradient(seed).tobytes(), cuts, header(role=role)))
        for op in ops:
            raw = apply_bytes(raw, op)
        assume(expect_push(raw, plane.view())[0] != OK)
        send_push(plane, "push_mutated", raw, ops)

    run()
    assert SENT["push_mutated"] >= MIN_SENT["push_mutated"]


def big_message(n: int, first: bool, offset: int = 0) -> bytes:
    c = tchunk(offset, b"\0" * n)
    m = ppb.GradientChunk(header=header(), chunk=c) if first else ppb.GradientChunk(chunk=c)
    return m.SerializeToString()


def test_push_oversized_chunks_and_messages(plane: DataPlane) -> None:
    """Chunks over 1 MiB in messages up to the 2 MiB limit: INVALID_ARGUMENT from the servicer;
    messages over 2 MiB: RESOURCE_EXHAUSTED from gRPC; the exact boundary included."""
    head = ser(stream(gradient(3).tobytes(), [600]))[:1]  # a good first message, 600 bytes

    # the largest first message gRPC still accepts, and one byte more
    m = 2 * MiB - 200
    n = MAX_MESSAGE_BYTES - (len(big_message(m, True)) - m)
    while len(big_message(n, True)) > MAX_MESSAGE_BYTES:
        n -= 1
    while len(big_message(n + 1, True)) <= MAX_MESSAGE_BYTES:
        n += 1
    assert len(big_message(n, True)) == MAX_MESSAGE_BYTES
    for size, want in ((n, IA), (n + 1, RE)):
        msgs = [big_message(size, True)]
        assert expect_push(msgs, plane.view())[0] == want
        send_push(plane, "push_oversized", msgs, size)

    @settings(FUZZ, max_examples=MIN_SENT["push_oversized"] - 2)
    @given(size=st.one_of(st.integers(MiB + 1, 2 * MiB - 100), st.integers(2 * MiB + 1,
                                                                           3 * MiB)),
           second=st.booleans())
    @example(size=MiB + 1, second=False)
    @example(size=2 * MiB + 64, second=True)
    def run(size: int, second: bool) -> None:
        msgs = [*head, big_message(size, False, 600)] if second else [big_message(size, True)]
        send_push(plane, "push_oversized", msgs, (size, second))

    run()
    assert SENT["push_oversized"] >= MIN_SENT["push_oversized"]


def test_push_abandoned_mid_stream(plane: DataPlane) -> None:
    """A client that stalls (deadline) or cancels with the role's lock held by its push: the
    server lets go, and the round is as before."""
    gate = threading.Event()
    good = ser(stream(gradient(4).tobytes(), [500]))

    def stalled(prefix: list[bytes]) -> Iterator[bytes]:
        yield from prefix
        gate.wait(30)

    board, lt = plane.board, plane.lt
    for prefix in (good[:1], []):
        got = push_raw(plane.channel, stalled(prefix), timeout=0.5)
        SENT["push_abandoned"] += 1
        assert got[0] == SC.DEADLINE_EXCEEDED, got
    for prefix in (good[:1], []):
        call = plane.channel.stream_unary(PUSH).future(stalled(prefix), timeout=30)
        time.sleep(0.2)
        call.cancel()
        SENT["push_abandoned"] += 1
        assert call.code() == SC.CANCELLED
    gate.set()
    deadline = time.time() + 10
    while lt.call(lambda: board.lock(OPEN).locked()) and time.time() < deadline:
        time.sleep(0.01)
    assert not lt.call(lambda: board.lock(OPEN).locked())
    plane.invariant()
    assert SENT["push_abandoned"] >= MIN_SENT["push_abandoned"]


def test_fetch_point_fuzz(plane: DataPlane) -> None:
    """FetchPoint with random bytes, unknown runs and roles, stale, future and random steps, and
    the point of a role whose gradient is already in."""
    @settings(FUZZ, max_examples=MIN_SENT["fetch"])
    @given(req=st.one_of(
        st.binary(max_size=48),
        st.builds(lambda r, s, o: ppb.PointRequest(run_id=r, step=s, role=o).SerializeToString(),
                  runs, steps, roles)))
    @example(req=b"\xff\xff")
    @example(req=ppb.PointRequest(run_id=RUN, step=STEP, role=DONE).SerializeToString())
    @example(req=ppb.PointRequest(run_id=RUN, step=STEP + 1, role=OPEN).SerializeToString())
    def run(req: bytes) -> None:
        want, reason = expect_fetch(req, plane.view())
        assume(want != OK)
        got = unary_stream_raw(plane.channel, FETCH, req)
        SENT["fetch"] += 1
        check_code(got, want, reason, req)
        plane.invariant()

    run()
    assert SENT["fetch"] >= MIN_SENT["fetch"]


def test_data_plane_unchanged_and_still_serving(plane: DataPlane) -> None:
    """After all of the above: health SERVING, the round exactly as it was (points, the received
    gradient and its buffer bit for bit), the open role's point still served intact, and a
    correct push resolves the open role's future with exactly the values pushed."""
    dp, lt, board = plane, plane.lt, plane.board
    for service in ("", PARAMETER_SERVICE):
        assert health_status(dp.target, service) == SERVING
    dp.invariant()
    assert {role: lt.call(lambda r=role: bytes(board.point_bytes(r))) for role in ROLES} == \
        dp.points
    assert bits(lt.call(board.buffer, DONE)) == dp.done_grad
    assert bits(lt.call(lambda: dp.futs[DONE].result()[0])) == dp.done_grad
    assert not lt.call(lambda: board.lock(OPEN).locked())
    req = ppb.PointRequest(run_id=RUN, step=STEP, role=OPEN).SerializeToString()
    code, details, chunks = unary_stream_raw(dp.channel, FETCH, req)
    assert code == OK, details
    assert b"".join(tensor_pb2.TensorChunk.FromString(c).data for c in chunks) == dp.points[OPEN]
    # the right gradient, in odd-sized chunks, lands intact
    g = gradient(999)
    g[0], g[1] = -0.0, 1e-45  # awkward but finite
    got = push_raw(dp.channel, ser(stream(g.tobytes(), [1, 5, 7, 402, 999], header(loss=2.0))))
    assert got[0] == OK and (got[2].bytes, got[2].chunks) == (NBYTES, 6), got
    grad, meta = lt.run(asyncio.wait_for(asyncio.shield(dp.futs[OPEN]), 10))
    assert bits(grad) == g.tobytes() and meta["loss"] == 2.0 and meta["step"] == STEP
    assert board.received == {OPEN, DONE} and bits(lt.call(board.buffer, DONE)) == dp.done_grad

