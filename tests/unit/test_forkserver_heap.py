"""The fork-server fills its heap's holes before it freezes it (``fill_free_blocks``).

Run in a fresh interpreter: the test makes holes on purpose (frees every other
object of several size classes) and checks, from the allocator's own statistics,
that they are occupied afterwards, so that a forked child's allocations cannot
land on (and copy) shared pages.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SCRIPT = """
    import json, sys
    from agentctl_swarm import forkserver

    def avail():
        rows = forkserver._POOL_ROW.findall(forkserver._debug_malloc_stats())
        return {int(size): int(n) for size, n in rows}

    keep = [bytes(n) for n in (40, 100, 200, 400) for _ in range(3000)]
    del keep[::2]  # 6000 holes in four size classes
    before = avail()
    filled = forkserver.fill_free_blocks()
    after = avail()
    print(json.dumps({"before": before, "after": after, "filled": filled}))
"""


def test_fill_free_blocks_occupies_the_holes() -> None:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    before = {int(k): v for k, v in data["before"].items()}
    after = {int(k): v for k, v in data["after"].items()}
    holes = {size: before[size] for size in (80, 144, 240, 448)}  # 33 + n bytes, rounded up to 16
    assert all(n >= 1400 for n in holes.values()), holes
    assert data["filled"] >= sum(holes.values())
    # Left free: what reading the statistics allocated and freed again (tuples of the
    # parsed rows fall in the 80-byte class), far below the holes made.
    assert all(after[size] < holes[size] // 4 for size in holes), {size: after[size] for size in holes}
