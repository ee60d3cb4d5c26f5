#!/usr/bin/env bash
# Refresh requirements.lock: every package the setup installs (pyproject.toml's dependencies and
# its `dev` extra, and all they pull in), each at one exact version, for Python 3.11 on Linux
# x86_64, with the CPU build of torch (TORCH_LOCK, default torch==2.13.0+cpu).
# Resolved by `uv pip compile` from the package indexes pip is configured with here
# (pip.conf / PIP_* variables), so the lock names what `pip install` finds on this machine.
# The versions already in requirements.lock are kept where they still fit; to move to newer
# releases: ./scripts/lock.sh --upgrade (all) or --upgrade-package NAME. Other arguments go to
# `uv pip compile`. uv is taken from PATH, or installed once into a folder of its own
# (UV_TOOL_DIR, default ~/.cache/sampa-ray/uv), never into .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_LOCK=${TORCH_LOCK:-torch==2.13.0+cpu}
UV=$(command -v uv || true)
if [ -z "$UV" ]; then
  dir=${UV_TOOL_DIR:-$HOME/.cache/sampa-ray/uv}
  [ -x "$dir/bin/uv" ] || "$PY" -m pip install -q --disable-pip-version-check --target "$dir" uv
  UV=$dir/bin/uv
fi
# pip's own index settings, in uv's words (unsafe-best-match: pip's rule, the best version
# across every index)
pipconf() { "$PY" -m pip config get "global.$1" 2>/dev/null || true; }
args=()
for u in $(pipconf index-url) ${PIP_INDEX_URL:-}; do args+=(--index-url "$u"); done
for u in $(pipconf extra-index-url) ${PIP_EXTRA_INDEX_URL:-}; do
  args+=(--extra-index-url "$u")
done
for u in $(pipconf find-links) ${PIP_FIND_LINKS:-}; do args+=(--find-links "$u"); done
echo "$TORCH_LOCK" | "$UV" pip compile pyproject.toml --extra dev --python-version 3.11 \
  --python-platform x86_64-manylinux_2_28 --index-strategy unsafe-best-match \
  "${args[@]}" --constraint - --no-emit-index-url --no-emit-find-links \
  --custom-compile-command ./scripts/lock.sh --quiet -o requirements.lock "$@"
echo "lock: requirements.lock holds $(grep -c '^[A-Za-z]' requirements.lock) packages"
