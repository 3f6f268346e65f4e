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


CORKED = """
    import json, time
    from agentctl_swarm import daemon
    from agentctl_swarm.agentchat import relay
    relay.CORK_S = 5.0  # as if a relay's fan-out were held back for 5 s
    relay.Relay.__init__.__kwdefaults__["cork"] = 5.0
    began = time.monotonic()
    done = daemon.rehearse(1)
    print(json.dumps({"done": done, "took": time.monotonic() - began}))
"""


def test_the_rehearsal_does_not_wait_on_the_relays_cork(tmp_path: Path) -> None:
    """Each rehearsal waits for its heartbeat's echo, and the fork-server forks nothing
    meanwhile: its relay must flush at once, not every CORK_S (it once idled ~20 ms per
    rehearsal, 12 % of a start of 10)."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(CORKED)], capture_output=True,
                         text=True, timeout=60, env={"TMPDIR": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["done"] == 1, out.stderr
    assert seen["took"] < 2.5, f"the rehearsal waited on the cork: {seen['took']:.2f} s"
