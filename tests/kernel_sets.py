"""The CPU kernel sets a user's processor may make torch pick, and how to make this machine use
each: ``python tests/kernel_sets.py`` prints one line per set below the processor's own
(``NAME VAR=VALUE ...``), which ``scripts/test.sh`` re-runs the ``outcome`` tests under.

Torch's own vectorised kernels follow ``ATEN_CPU_CAPABILITY``, but its matrix products run in
MKL and oneDNN, which pick their code paths from the processor themselves: an AVX2-only
processor is only reproduced here when all three are held to AVX2. (Holding ATen alone to AVX2
on an AVX-512 machine left the transformer test passing that failed on an AVX2 processor; with
MKL held too, it failed the same way.)
"""

from __future__ import annotations

import os
import subprocess
import sys

#: from the least to the most capable; each with the variables that hold every library to it
SETS: dict[str, dict[str, str]] = {
    "default": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
                "ONEDNN_MAX_CPU_ISA": "SSE41"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
             "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "MKL_ENABLE_INSTRUCTIONS": "AVX512",
               "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
}
_VARS = {var for env in SETS.values() for var in env}


def own_set() -> str:
    """The set torch picks on this processor when nothing holds it back (asked of a fresh
    process, since the choice is made once per process)."""
    env = {k: v for k, v in os.environ.items() if k not in _VARS}
    out = subprocess.run([sys.executable, "-c", "import torch; "
                          "print(torch.backends.cpu.get_cpu_capability())"],
                         env=env, capture_output=True, text=True, check=True).stdout
    name = out.strip().lower()
    return name if name in SETS else "avx512" if name.startswith("avx512") else "default"


def other_sets() -> list[str]:
    """The sets below this processor's own: each one some user's processor picks."""
    names = list(SETS)
    return names[:names.index(own_set())]


if __name__ == "__main__":
    for name in other_sets():
        print(name, *(f"{k}={v}" for k, v in SETS[name].items()))
