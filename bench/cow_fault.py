"""What one copy-on-write fault costs on this machine, and whether pre-faulting helps.

Run:  python bench/cow_fault.py [--pages 950] [--forks 20]

A parent makes a 16 MB private anonymous mapping resident, then forks children that
each write one byte to the same ``--pages`` scattered pages (about what an idle daemon
copies from the fork-server), and report their CPU time for it (median of ``--forks``):
once by plain faults, once after ``madvise(MADV_POPULATE_WRITE)`` on each run of
adjacent pages. A daemon's boot pays the first figure for its ~950 pages.
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import statistics
import sys
import time

PAGE = mmap.PAGESIZE
MADV_POPULATE_WRITE = 23  # Linux 5.14


def runs_of(pages: list[int]) -> list[tuple[int, int]]:
    """[start, end) runs of adjacent pages."""
    runs: list[list[int]] = []
    for page in pages:
        if runs and runs[-1][1] == page:
            runs[-1][1] = page + 1
        else:
            runs.append([page, page + 1])
    return [(a, b) for a, b in runs]


def child_cpu(area: mmap.mmap, pages: list[int], populate: bool) -> float:
    """CPU seconds of a forked child that writes one byte to each page."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read)
        start = time.process_time()
        if populate:
            for a, b in runs_of(pages):
                area.madvise(MADV_POPULATE_WRITE, a * PAGE, (b - a) * PAGE)
        for page in pages:
            area[page * PAGE] = 2
        os.write(write, repr(time.process_time() - start).encode())
        os._exit(0)
    os.close(write)
    try:
        return float(os.read(read, 64))
    finally:
        os.close(read)
        os.waitpid(pid, 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=950)
    parser.add_argument("--forks", type=int, default=20)
    args = parser.parse_args(argv)
    total = 4096  # 16 MB of 4 kB pages
    area = mmap.mmap(-1, total * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for page in range(total):
        area[page * PAGE] = 1  # resident in the parent, so the child's writes copy
    pages = sorted(random.Random(1).sample(range(total), min(args.pages, total)))
    print(f"{len(pages)} pages in {len(runs_of(pages))} runs of adjacent pages")
    for populate in (False, True, False, True):  # interleaved: the machine drifts
        cpu = statistics.median(child_cpu(area, pages, populate) for _ in range(args.forks))
        how = "MADV_POPULATE_WRITE, then writes" if populate else "writes (copy-on-write faults)"
        print(f"  {how:34s} {cpu * 1e3:6.2f} ms, {cpu * 1e6 / len(pages):5.2f} us a page")
    return 0


if __name__ == "__main__":
    sys.exit(main())
