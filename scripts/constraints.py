"""The pip constraints an install takes from requirements.lock, for the torch it installs.

    python3 scripts/constraints.py TORCH_SPEC [LOCK] > constraints.txt

With the locked torch (TORCH_SPEC ``torch==2.13.0``, the CPU build setup installs, or the
lock's own ``torch==2.13.0+cpu``): every locked pin. With any other torch (``TORCH_SPEC=torch``
on a GPU machine, another version, a CUDA build, or an empty spec where the base image brings
its own): every pin except torch and the packages the lock holds only for torch (its ``# via``
annotations, followed to their end: sympy and mpmath, networkx, jinja2 and markupsafe), so
that torch build's own requirements decide those. Standard library only: it runs before
anything is installed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(text: str) -> tuple[dict[str, str], dict[str, set[str]]]:
    """The lock's pins (normalised name -> version) and who needs each (its ``# via`` names;
    a requirement file or pyproject.toml counts as a name no package has)."""
    pins: dict[str, str] = {}
    via: dict[str, set[str]] = {}
    current = None
    for line in text.splitlines():
        if m := PIN.match(line):
            current = _norm(m.group(1))
            pins[current], via[current] = m.group(2), set()
        elif (current and (m := re.match(r"^\s+#\s+(?:via\s+)?(\S.*)$", line))
              and m.group(1).strip() != "via"):
            via[current].add(_norm(m.group(1).split()[0]))
    return pins, via


def constraints(torch_spec: str, text: str) -> list[str]:
    """``name==version`` lines for an install of ``torch_spec`` from the lock ``text``."""
    pins, via = read_lock(text)
    locked = pins.get("torch")
    spec = torch_spec.replace(" ", "")
    keep_torch = locked is not None and spec in (f"torch=={locked}",
                                                 f"torch=={locked.split('+')[0]}")
    dropped = set() if keep_torch else {"torch"}
    while not keep_torch:  # packages needed by dropped packages alone, to the end of the chain
        more = {p for p, v in via.items() if p not in dropped and v and v <= dropped}
        if not more:
            break
        dropped |= more
    return [f"{p}=={v}" for p, v in pins.items() if p not in dropped]


def main() -> None:
    spec = sys.argv[1] if len(sys.argv) > 1 else ""
    lock = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).parents[1] / \
        "requirements.lock"
    print("\n".join(constraints(spec, lock.read_text())))


if __name__ == "__main__":
    main()
