#!/usr/bin/env bash
# Generate the Python code for protos/sampa/v1/*.proto: messages (_pb2.py), gRPC stubs
# (_pb2_grpc.py) and type stubs (.pyi), with imports made package-relative so that
# `from sampa_ray.proto.sampa.v1 import tensor_pb2` works.
#
#   scripts/gen_protos.sh [OUTDIR]        (default: sampa_ray/proto)
#
# Uses $PYTHON (default .venv/bin/python, else python3) with grpcio-tools and mypy-protobuf.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-$ROOT/sampa_ray/proto}"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
PYTHON="$(command -v "$PYTHON")"
BIN="$(dirname "$PYTHON")"
for plugin in protoc-gen-mypy protoc-gen-mypy_grpc; do
    if [[ ! -x "$BIN/$plugin" ]]; then
        echo "gen_protos: $BIN/$plugin not found (install mypy-protobuf next to $PYTHON)" >&2
        exit 2
    fi
done

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
GEN="$OUT/sampa"
rm -rf "$GEN"
cd "$ROOT/protos"
LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT
status=0
"$PYTHON" -m grpc_tools.protoc -I . \
    --python_out="$OUT" --grpc_python_out="$OUT" \
    --mypy_out="$OUT" --mypy_grpc_out="$OUT" \
    --plugin=protoc-gen-mypy="$BIN/protoc-gen-mypy" \
    --plugin=protoc-gen-mypy_grpc="$BIN/protoc-gen-mypy_grpc" \
    sampa/v1/*.proto 2>"$LOG" || status=$?
grep -v '^Writing mypy to' "$LOG" >&2 || true
if [[ $status -ne 0 ]]; then
    echo "gen_protos: protoc failed (exit $status)" >&2
    exit "$status"
fi

# package-relative imports: `from sampa.v1 import x_pb2` -> `from . import x_pb2`
"$PYTHON" - "$GEN/v1" <<'PY'
import pathlib, re, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.py*")):
    text = f.read_text()
    f.write_text(re.sub(r"^from sampa\.v1 import ", "from . import ", text, flags=re.M))
PY
printf '"""Generated code for protos/sampa (scripts/gen_protos.sh)."""\n' > "$GEN/__init__.py"
printf '"""Generated code for protos/sampa/v1 (scripts/gen_protos.sh)."""\n' > "$GEN/v1/__init__.py"
