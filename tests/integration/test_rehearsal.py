"""The fork-server's rehearsal: real daemon boots in-process, and nothing left behind."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = """
    import json, logging, os, signal, sys
    from agentctl_swarm import daemon
    sentinel = logging.StreamHandler(sys.stderr)
    logging.getLogger().addHandler(sentinel)
    if sys.argv[1] == "broken":
        from agentctl_swarm.agentchat import relay
        async def refuse(self):
            raise OSError("no loopback here")
        relay.Relay.start = refuse
    done = daemon.rehearse(2)
    print(json.dumps({"done": done, "handlers_kept": logging.getLogger().handlers == [sentinel],
                      "left": os.listdir(os.environ["TMPDIR"]),
                      "threads": len(os.listdir("/proc/self/task"))}))
"""


def _rehearse(tmp_path: Path, mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT), mode], capture_output=True,
                         text=True, timeout=60, env={"TMPDIR": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "stderr": out.stderr}


def test_rehearsal_boots_daemons_and_leaves_the_process_as_it_was(tmp_path: Path) -> None:
    seen = _rehearse(tmp_path, "ok")
    assert seen["done"] == 2, seen["stderr"]
    assert seen["handlers_kept"] and seen["left"] == []
    assert seen["threads"] == 1, "the fork-server must stay single-threaded (CLONE_PARENT fork)"


def test_a_failed_rehearsal_is_reported_not_raised(tmp_path: Path) -> None:
    seen = _rehearse(tmp_path, "broken")
    assert seen["done"] == 0 and "rehearsal failed" in seen["stderr"]
    assert seen["handlers_kept"] and seen["left"] == []
