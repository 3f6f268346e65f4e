"""CI wrapper: a 3-minute soak with a fixed seed must pass every check.

The soak prints its table of checks; on failure the assertion message carries the
failed rows and the soak's HOME (logs, supervisor.stderr) for the post-mortem.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parent / "soak.py"
MINUTES = 3
SEED = 1


@pytest.mark.soak
def test_short_soak_embedded_relay() -> None:
    result = subprocess.run([sys.executable, str(SOAK), "--minutes", str(MINUTES), "--seed", str(SEED)],
                            capture_output=True, text=True, timeout=MINUTES * 60 + 600)
    output = result.stdout + result.stderr
    failed = [line for line in output.splitlines() if "  FAIL  " in line or line.startswith("RESULT")]
    assert result.returncode == 0, "soak failed:\n" + "\n".join(failed) + "\n\n" + output[-6000:]
    assert "RESULT: PASS" in output
