"""The fixed part of a start: when the CLI's interpreter is up, when the fork-server's
preload begins and ends, and when the supervisor is ready to fork.

Run:  python bench/start_timeline.py [--count 10] [--starts 3]

Starts a swarm as ``swarm_bench.py`` does (own HOME on tmpfs, own relay, observer), with
the CLI run through a wrapper that appends a wall-clock mark to a file when its
interpreter is up, when the CLI is imported, and around ``forkserver.preload()`` (the
fork-server is forked from the CLI, so it inherits the wrapper). Prints each mark and
the supervisor's first log lines in seconds from the launch, then the ready time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import swarm_bench  # noqa: E402
from tests import swarmlib  # noqa: E402

_WRAPPER = """
import os, sys, time
def mark(what):
    with open(MARKS, "a") as out:
        out.write(f"{time.time():.6f} {os.getpid()} {what}\\n")
mark("interpreter up")
from agentctl_swarm import cli, forkserver
mark("CLI imported")
_preload = forkserver.preload
def preload(*args, **kwargs):
    mark("preload begins")
    _preload(*args, **kwargs)
    mark("preload ends")
forkserver.preload = preload
sys.exit(cli.main(sys.argv[1:]))
"""


def one_start(count: int, base: Path) -> None:
    marks = base / f"marks-{time.monotonic_ns()}"
    swarmlib.AGENTCTL[:] = [sys.executable, "-c", _WRAPPER.replace("MARKS", repr(str(marks)))]
    run = swarm_bench.Run("fork-server", count, base)
    try:
        ready = run.start()
        t0 = time.time() - (time.monotonic() - run.t_launch)  # the launch, on the wall clock
        rows = []
        for line in marks.read_text().splitlines():
            stamp, pid, what = line.split(" ", 2)
            rows.append((float(stamp) - t0, f"pid {pid}: {what}"))
        log = next(run.swarm.home.rglob("supervisor.log"))
        for line in log.read_text().splitlines()[:4]:
            entry = json.loads(line)
            stamp = datetime.fromisoformat(entry["ts"].replace("Z", "+00:00")).timestamp()
            rows.append((stamp - t0, f"supervisor: {entry['msg'][:90]}"))
        for at, what in sorted(rows):
            print(f"  {at:6.3f} s  {what}")
        print(f"  ready in {ready:.3f} s\n", flush=True)
    finally:
        run.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--starts", type=int, default=3)
    args = parser.parse_args(argv)
    print(swarm_bench.byte_compile_package())
    base = Path(tempfile.mkdtemp(prefix="start-timeline-", dir=swarm_bench.default_scratch()))
    for _ in range(args.starts):
        one_start(args.count, base)
    return 0


if __name__ == "__main__":
    sys.exit(main())
