"""What a user meets around the runs themselves: help texts, default folder names, resuming,
output into pipes and files, and ``sampa-ray runs``. Real subprocesses of the CLI on the local
backend, small runs on the bundled digits."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from conftest import cli_cmd, cli_env

COMMON = ["--backend", "local", "--threads", "1", "--device", "cpu"]


def cli(*args: str, cwd: Path, timeout: float = 180,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli_cmd(*args), cwd=cwd, env=env or cli_env(), capture_output=True,
                          text=True, timeout=timeout)


# -- help texts -------------------------------------------------------------------------------
def _options(help_text: str) -> dict[str, str]:
    """``--flag``: its help text, from argparse's ``options:`` section (an option starts a line
    two spaces in; its help follows two or more spaces later, or on the lines below)."""
    section = help_text.split("\noptions:\n", 1)[1]
    found: dict[str, str] = {}
    current = None
    for line in section.splitlines():
        if line.startswith("  -"):
            invocation, _, text = line.strip().partition("  ")
            current = invocation.split(",")[-1].split()[0]
            found[current] = text.strip()
        elif line.startswith("   ") and current is not None:
            found[current] = f"{found[current]} {line.strip()}".strip()
        else:
            current = None
    return found


@pytest.mark.parametrize("command", ["train", "compare"])
def test_every_option_has_help_and_one_default(command: str, tmp_path: Path) -> None:
    proc = cli(command, "--help", cwd=tmp_path, env={**cli_env(), "COLUMNS": "100"})
    assert proc.returncode == 0, proc.stderr
    options = _options(proc.stdout)
    assert len(options) > 60 and "--lr" in options and "--out" in options
    # a description, not only a default
    missing = [flag for flag, text in options.items()
               if not re.sub(r"\(default: [^)]*\)", "", text).strip()]
    assert not missing, f"no description: {missing}"
    doubled = [flag for flag, text in options.items() if text.count("(default:") > 1]
    assert not doubled, f"two defaults: {doubled}"
    assert "(default: None)" not in proc.stdout
    assert re.search(r"\(default: \$SAMPA_RAY_TOKEN\)$", options["--token-file"])
    assert options["--lr"].endswith("(default: 0.05)")
    assert options["--sync-bn"].count("default") == 1  # the description says it
