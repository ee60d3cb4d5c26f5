"""The committed generated code is exactly what scripts/gen_protos.sh makes of protos/, and the
services have the shape the transport relies on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sampa_ray.proto.sampa.v1 import coordinator_service_pb2, parameter_service_pb2, tensor_pb2

REPO = Path(__file__).resolve().parents[1]
GENERATED = REPO / "sampa_ray" / "proto" / "sampa"


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(REPO / "scripts" / "gen_protos.sh"), str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    fresh, committed = _files(tmp_path / "sampa"), _files(GENERATED)
    assert sorted(fresh) == sorted(committed), "run scripts/gen_protos.sh: file set differs"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"run scripts/gen_protos.sh: {stale} differ from protos/"
    for name, text in fresh.items():  # imports are package-relative
        assert b"from sampa.v1 import" not in text and b"import sampa." not in text, name
    for kind in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi"):
        assert any(n.endswith(kind) for n in fresh), kind


def test_service_shapes() -> None:
    params = parameter_service_pb2.DESCRIPTOR.services_by_name["ParameterService"]
    fetch, push = params.methods_by_name["FetchPoint"], params.methods_by_name["PushGradient"]
    assert (fetch.client_streaming, fetch.server_streaming) == (False, True)
    assert fetch.output_type.full_name == "sampa.v1.TensorChunk"
    assert (push.client_streaming, push.server_streaming) == (True, False)
    coord = coordinator_service_pb2.DESCRIPTOR.services_by_name["CoordinatorService"]
    assert set(coord.methods_by_name) == {"GetStatus", "WatchProgress", "Checkpoint", "Stop"}
    assert coord.methods_by_name["WatchProgress"].server_streaming
    assert list(tensor_pb2.TensorChunk.DESCRIPTOR.fields_by_name) == \
        ["dtype", "shape", "total_bytes", "offset", "data"]
    header = parameter_service_pb2.GradientHeader.DESCRIPTOR.fields_by_name
    assert {"run_id", "step", "role", "dtype", "shape", "numel", "loss", "accuracy",
            "timings"} <= set(header)
    status = coordinator_service_pb2.StatusReply.DESCRIPTOR.fields_by_name
    assert {"run_id", "algorithm", "step", "epoch", "loss", "accuracy", "workers", "transport",
            "metrics_port"} <= set(status)
