"""Interleaved A/B starts of two or more versions of the code: ready time and memory.

Run:  python bench/ab_start.py [--count 100] [--rounds 5] ARM ARM [ARM ...]

An ARM is a git revision of this repository (exported with ``git archive`` into a
temporary directory) or a directory holding a copy of the project. Each arm is
byte-compiled (as an install is; see ``swarm_bench.byte_compile_package``), then the
arms are started in turn, round after round: one start of ``--count`` daemons each,
with each arm's own ``bench/swarm_bench.py`` and relay, in a fresh HOME on tmpfs. The
machine's speed drifts by tens of percent within an hour here, so only arms measured
interleaved, in the same minutes, can be compared; a full ``swarm_bench.py`` run
cannot tell a 5 % change from the drift. Prints each start as it ends, then the median
ready time, USS and PSS per arm, and each arm's ratio to the first.

``--preload`` measures instead the fork-server's way to its first fork, alone: a fresh
interpreter that imports the CLI and runs ``forkserver.preload()``, its CPU time
(``time.process_time``, interpreter start included) per arm; a start's fixed part.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from swarm_bench import byte_compile_package  # noqa: E402

# Runs inside an arm's directory, with that arm's code on sys.path.
_ONE_START = r"""
import json, shutil, sys, tempfile, time
from pathlib import Path
sys.path[:0] = ["bench", "."]
import swarm_bench
base = Path(tempfile.mkdtemp(prefix="ab-start-home-", dir=SCRATCH))
run = swarm_bench.Run("fork-server", COUNT, base)
try:
    ready = run.start()
    time.sleep(2.0)  # past the boot: the first heartbeat round has settled
    print(json.dumps({"ready": ready, **run.memory()}))
finally:
    run.stop()
    shutil.rmtree(base, ignore_errors=True)
"""


def export(arm: str, target: Path) -> Path:
    """The directory of ``arm``: itself if it is one, else ``git archive`` of the revision
    unpacked into ``target``."""
    if Path(arm).is_dir():
        return Path(arm).resolve()
    target.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", arm], capture_output=True)
    if archive.returncode != 0:
        raise SystemExit(f"ab_start: {arm!r} is neither a directory nor a revision: "
                         f"{archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target


# Runs inside an arm's directory: the fork-server's preload, as prestart runs it.
_ONE_PRELOAD = r"""
import json, sys, time
sys.path[:0] = ["."]
from agentctl_swarm import cli, forkserver
forkserver.preload()
print(json.dumps({"preload_cpu_ms": 1000 * time.process_time()}))
"""


def one_preload(directory: Path) -> dict[str, float]:
    return _run_in(directory, _ONE_PRELOAD, "a preload", timeout=120)


def one_start(directory: Path, count: int, scratch: str) -> dict[str, float]:
    code = _ONE_START.replace("COUNT", str(count)).replace("SCRATCH", repr(scratch))
    return _run_in(directory, code, "a start", timeout=600)


def _run_in(directory: Path, code: str, what: str, timeout: float) -> dict[str, float]:
    """Run ``code`` in a fresh interpreter with the arm's package first on its path; the
    JSON object it prints last."""
    done = subprocess.run([sys.executable, "-c", code], cwd=directory, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(directory)}, timeout=timeout)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise SystemExit(f"ab_start: {what} in {directory} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("arms", nargs="+", metavar="ARM", help="git revision or directory")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--preload", action="store_true",
                        help="time the fork-server's preload alone, not a start")
    parser.add_argument("--scratch", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                        help="where the HOMEs go (default /dev/shm: see swarm_bench --scratch)")
    args = parser.parse_args(argv)
    if len(args.arms) < 2:
        parser.error("give at least two arms")
    # The same arm may be given twice (a null A/B shows the noise): label each by position.
    sources = args.arms
    args.arms = [arm if sources.count(arm) == 1 else f"{arm}#{i + 1}" for i, arm in enumerate(sources)]
    work = Path(tempfile.mkdtemp(prefix="ab-start-"))
    try:
        dirs = [export(arm, work / label.replace("/", "_")) for arm, label in zip(sources, args.arms)]
        seen = _interleave(args, dirs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _report(args, seen)
    return 0


def _interleave(args: argparse.Namespace, dirs: list[Path]) -> dict[str, list[dict[str, float]]]:
    for directory in dirs:
        byte_compile_package(directory)
    seen: dict[str, list[dict[str, float]]] = {arm: [] for arm in args.arms}
    for rnd in range(args.rounds):
        for arm, directory in zip(args.arms, dirs):
            if args.preload:
                row = one_preload(directory)
                print(f"round {rnd + 1} {arm}: preload {row['preload_cpu_ms']:.0f} ms of CPU", flush=True)
            else:
                row = one_start(directory, args.count, args.scratch)
                print(f"round {rnd + 1} {arm}: ready {row['ready']:.2f} s, USS {row['uss_mb']:.3f} MB, "
                      f"PSS {row['pss_mb']:.3f} MB", flush=True)
            seen[arm].append(row)
    return seen


def _report(args: argparse.Namespace, seen: dict[str, list[dict[str, float]]]) -> None:
    if args.preload:
        print(f"\nmedians over {args.rounds} rounds, the fork-server's preload:")
        base = statistics.median(r["preload_cpu_ms"] for r in seen[args.arms[0]])
        for arm in args.arms:
            cpu = statistics.median(r["preload_cpu_ms"] for r in seen[arm])
            print(f"  {arm}: {cpu:.0f} ms of CPU ({cpu / base:.2f}x the first)")
        return
    print(f"\nmedians over {args.rounds} rounds, N = {args.count}:")
    first = None
    for arm in args.arms:
        ready = statistics.median(r["ready"] for r in seen[arm])
        uss = statistics.median(r["uss_mb"] for r in seen[arm])
        pss = statistics.median(r["pss_mb"] for r in seen[arm])
        first = first or (ready, uss)
        print(f"  {arm}: ready {ready:.2f} s ({ready / first[0]:.2f}x the first), "
              f"USS {uss:.3f} MB ({uss - first[1]:+.3f}), PSS {pss:.3f} MB")


if __name__ == "__main__":
    sys.exit(main())
