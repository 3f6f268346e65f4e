"""How busy the whole machine is, every 100 ms, while something else runs.

Run:  python bench/cpu_busy.py SECONDS > busy.txt &  python bench/swarm_bench.py ...

Prints one line per sample: the wall-clock time and the fraction of all CPUs busy
since the previous sample (from /proc/stat: everything but idle and iowait).
docs/benchmarks.md uses it to show that a 100-daemon start keeps both cores 100 %
busy: ready time there is CPU, not waiting.
"""
from __future__ import annotations

import sys
import time


def _sample() -> tuple[int, int]:
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:9]]
    return sum(values), values[3] + values[4]  # total, idle + iowait


def main(argv: list[str]) -> int:
    seconds = float(argv[1]) if len(argv) > 1 else 60.0
    end = time.time() + seconds
    total, idle = _sample()
    while time.time() < end:
        time.sleep(0.1)
        t2, i2 = _sample()
        busy = 1.0 - (i2 - idle) / max(1, t2 - total)
        print(f"{time.time():.3f} {busy:.2f}", flush=True)
        total, idle = t2, i2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
