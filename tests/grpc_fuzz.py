"""What the gRPC fuzz suites share (``test_fuzz_grpc_data``, ``_control`` and ``_live``): the
constants of the fuzzed round, raw calls (bytes out, code, details and reply back), the builders of
well-formed streams, and the data-plane server with one role's gradient in and one still open.

Generation is derandomized (``FUZZ``), so every run sends the same messages; ``MIN_SENT`` is how
many messages (unary requests and whole streams) each test must send, together well over 1,000.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import torch
from conftest import LoopThread
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, settings

from sampa_ray.proto.sampa.v1 import parameter_service_pb2 as ppb
from sampa_ray.proto.sampa.v1 import tensor_pb2
from sampa_ray.transport.grpc.control_plane import COORDINATOR_SERVICE
from sampa_ray.transport.grpc.data_plane import PARAMETER_SERVICE, RoundBoard
from sampa_ray.transport.grpc.server import start_server, stop_server

SC = grpc.StatusCode
OK, IA, NF, FP = SC.OK, SC.INVALID_ARGUMENT, SC.NOT_FOUND, SC.FAILED_PRECONDITION
AE, RE = SC.ALREADY_EXISTS, SC.RESOURCE_EXHAUSTED
#: bytes that do not decode as the method's request message: grpc.aio answers UNKNOWN, with
#: details naming the DecodeError (checked, so a crash in a servicer cannot pass for it)
UNDECODABLE = SC.UNKNOWN
MiB = 1 << 20

RUN = "fuzz-run-1"
STEP = 7
NUMEL = 250
NBYTES = NUMEL * 4
OPEN, DONE = "perturbed", "extrapolated"  # DONE's gradient is in before the fuzzing starts
ROLES = (OPEN, DONE)
PUSH = f"/{PARAMETER_SERVICE}/PushGradient"
FETCH = f"/{PARAMETER_SERVICE}/FetchPoint"
CONTROL = {name: f"/{COORDINATOR_SERVICE}/{name}"
           for name in ("GetStatus", "WatchProgress", "Checkpoint", "Stop")}
REAL_METHODS = {PUSH, FETCH, *CONTROL.values()}

#: messages (unary requests and whole streams) each test must send; together well over 1,000
MIN_SENT = {"push_bytes": 150, "push_header": 200, "push_framing": 200, "push_nonfinite": 100,
            "push_mutated": 150, "push_oversized": 25, "push_abandoned": 4, "fetch": 150,
            "control_unary": 150, "control_watch": 100, "unknown_method": 50, "token": 120,
            "live": 400}
SENT: Counter[str] = Counter()

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=list(HealthCheck))

NEAR_ROLES = ["", "Perturbed", "perturbed ", " perturbed", "perturbed\x00", "extrapolate",
              "ascent", "grad", "PERTURBED", "perturbed/extrapolated", "é"]
NEAR_DTYPES = ["", "float", "f4", "<f4", "FLOAT32", "float32 ", "torch.float32", "fp32",
               "float32\x00"]


# -- raw calls: bytes out, (code, details, reply bytes) back -------------------------------------
Reply = tuple[grpc.StatusCode, str, Any]


def _error(err: grpc.RpcError) -> Reply:
    return err.code(), err.details() or "", None


def push_raw(ch: grpc.Channel, msgs: list[bytes] | Iterator[bytes], timeout: float = 20.0,
             metadata: Any = None) -> Reply:
    try:
        call = ch.stream_unary(PUSH, response_deserializer=ppb.PushReply.FromString)
        return OK, "", call(iter(msgs), timeout=timeout, metadata=metadata)
    except grpc.RpcError as err:
        return _error(err)


def unary_stream_raw(ch: grpc.Channel, path: str, req: bytes, timeout: float = 20.0,
                     metadata: Any = None) -> Reply:
    try:
        return OK, "", list(ch.unary_stream(path)(req, timeout=timeout, metadata=metadata))
    except grpc.RpcError as err:
        return _error(err)


def unary_raw(ch: grpc.Channel, path: str, req: bytes, timeout: float = 20.0,
              metadata: Any = None) -> Reply:
    try:
        return OK, "", ch.unary_unary(path)(req, timeout=timeout, metadata=metadata)
    except grpc.RpcError as err:
        return _error(err)


def check_code(got: Reply, want: grpc.StatusCode, reason: str, what: Any) -> None:
    code, details, _ = got
    assert code == want, f"{what!r}: expected {want.name} ({reason}), got {code.name}: {details}"
    if reason == "undecodable":
        assert "DecodeError" in details, (what, details)


def health_status(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10).status


SERVING = health_pb2.HealthCheckResponse.SERVING

@dataclass(frozen=True)
class View:
    """What the validation depends on: the board's run, open step, roles and received roles."""

    run_id: str
    step: int | None
    roles: tuple[str, ...]
    received: frozenset[str]
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * 4


def view_of(lt: LoopThread, board: RoundBoard) -> View:
    return lt.call(lambda: View(board.run_id, board.step, board.roles, board.received,
                                board.numel))


# -- building streams ----------------------------------------------------------------------------
def gradient(seed: int, numel: int = NUMEL) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(numel).astype("<f4")


def header(**kw: Any) -> ppb.GradientHeader:
    base: dict[str, Any] = {"run_id": RUN, "step": STEP, "role": OPEN, "dtype": "float32",
                            "shape": [NUMEL], "numel": NUMEL, "loss": 0.5, "accuracy": 0.75,
                            "timings": {"compute": 0.01}}
    return ppb.GradientHeader(**{**base, **kw})


U64_MAX = 2**64 - 1  # the largest offset a TensorChunk can carry


def tchunk(offset: int, data: bytes, total: int = NBYTES, numel: int = NUMEL,
           dtype: str = "float32") -> tensor_pb2.TensorChunk:
    return tensor_pb2.TensorChunk(dtype=dtype, shape=[numel], total_bytes=total, offset=offset,
                                  data=data)


def stream(raw: bytes, cuts: list[int], head: ppb.GradientHeader | None = None,
           numel: int = NUMEL) -> list[ppb.GradientChunk]:
    """The messages of a well-formed push of ``raw`` cut at ``cuts``."""
    bounds = [0, *sorted(set(cuts)), len(raw)]
    chunks = [tchunk(a, raw[a:b], len(raw), numel) for a, b in zip(bounds, bounds[1:],
                                                                    strict=False)]
    head = head if head is not None else header()
    return [ppb.GradientChunk(header=head, chunk=chunks[0])] + \
        [ppb.GradientChunk(chunk=c) for c in chunks[1:]]


def ser(msgs: list[ppb.GradientChunk]) -> list[bytes]:
    return [m.SerializeToString() for m in msgs]


def bits(t: torch.Tensor | np.ndarray) -> bytes:
    if isinstance(t, torch.Tensor):
        t = t.contiguous().numpy()
    return t.tobytes()

# -- the data-plane server -----------------------------------------------------------------------
@dataclass
class DataPlane:
    lt: LoopThread
    board: RoundBoard
    target: str
    channel: grpc.Channel
    points: dict[str, bytes]
    futs: dict[str, asyncio.Future]
    done_grad: bytes
    start: View
    round_id: int

    def view(self) -> View:
        return view_of(self.lt, self.board)

    def invariant(self) -> None:
        """The round as it was: same step, round, roles and received roles; OPEN still open."""
        assert self.view() == self.start
        assert self.lt.call(lambda: self.board.round_id) == self.round_id
        assert not self.futs[OPEN].done()



def data_plane(lt: LoopThread) -> Iterator[DataPlane]:
    """A data-plane server whose round (step ``STEP``) has DONE's gradient in and OPEN still
    open; the round as it starts is ``start``."""
    board = RoundBoard(RUN, NUMEL)
    points = {role: torch.from_numpy(gradient(100 + i)) for i, role in enumerate(ROLES)}
    futs = lt.call(board.open_round, STEP, points)
    server, port = lt.run(start_server(board, None))
    target = f"127.0.0.1:{port}"
    ch = grpc.insecure_channel(target)  # no client-side limit on what it sends
    try:
        done_grad = gradient(200).tobytes()
        got = push_raw(ch, ser(stream(done_grad, [333], header(role=DONE))))
        assert got[0] == OK and (got[2].bytes, got[2].chunks) == (NBYTES, 2), got
        assert bits(lt.run(asyncio.wait_for(asyncio.shield(futs[DONE]), 10))[0]) == done_grad
        point_bits = {role: bits(p) for role, p in points.items()}
        dp = DataPlane(lt, board, target, ch, point_bits, futs, done_grad,
                       view_of(lt, board), board.round_id)
        assert dp.start.received == {DONE} and dp.start.step == STEP
        yield dp
    finally:
        ch.close()
        lt.run(stop_server(server, 0))

