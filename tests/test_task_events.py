"""Ray's GCS server keeps no task events of the calls a run makes every round or every epoch:
it would keep about 3.5 KiB per call, 7 KiB per step of a long run
(``benchmarks/memory.py`` measures every process's memory over a long run)."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from sampa_ray.config import make_config
from sampa_ray.ray import run_ray

pytestmark = pytest.mark.usefixtures("ray_local")

#: the actor methods called every round, every epoch, or every quarter second
UNTRACKED = ("GradientWorker.call", "GradientWorker.start_eval",
             "GradientWorker.finished_evals", "Coordinator.poll")


def task_names() -> Counter[str]:
    """How many tasks of each name the GCS server holds events of (asked over its own gRPC
    service: an embedded instance has no state API server)."""
    import ray
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    address = ray._private.worker.global_worker.gcs_client.address
    channel = init_grpc_channel(address, asynchronous=False)
    try:
        stub = gcs_service_pb2_grpc.TaskInfoGcsServiceStub(channel)
        reply = stub.GetTaskEvents(gcs_service_pb2.GetTaskEventsRequest(limit=100_000),
                                   timeout=30)
    finally:
        channel.close()
    return Counter(e.task_info.name for e in reply.events_by_task)


@pytest.mark.parametrize("data_path", ["replicated", "points"])
def test_rounds_leave_no_task_events(tmp_path, data_path):
    cfg = make_config({"algo": "sampa", "steps": 60, "batch_size": 32, "threads": 1,
                       "backend": "ray", "data_path": data_path})
    before = task_names()
    run_ray(cfg, tmp_path / "run")
    # The processes report their events every second. The GCS holds those of the calls made
    # once per run (the two workers' configure at its start), so it would hold the rounds'.
    deadline = time.monotonic() + 10
    while (names := task_names() - before)["GradientWorker.configure"] < 2 \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    assert names["GradientWorker.configure"] == 2, names
    assert not {n: names[n] for n in UNTRACKED if names[n]}, names
