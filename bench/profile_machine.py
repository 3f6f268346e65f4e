"""Where the whole machine's CPU goes while N daemons start: perf, by process role and kind.

Run:  python bench/profile_machine.py [--count 100] [--seconds 4] [--freq 1000]

Starts a swarm as ``swarm_bench.py`` does (own HOME on tmpfs, own relay, observer)
under ``perf record -a -g``, then splits every sample taken in the spawn window
(first to 97th percentile of the daemons' samples) by role (daemon, supervisor,
fork-server, relay, the benchmark's observer, other) and by kind: user code,
copy-on-write page faults, other page faults, fork (``copy_process``), exit,
system calls; and, for the daemons, the system calls that cost most. Needs
``perf`` (Debian: linux-perf) and root. Slower than an unprofiled start.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from swarm_bench import Observer, Relay, Run, byte_compile_package, default_scratch, descendants  # noqa: E402


def record(count: int, seconds: float, freq: int, out: Path) -> dict[int, str]:
    """Run the start under perf; returns pid -> role."""
    from tests.swarmlib import Swarm
    run = Run("fork-server", count, out)
    roles = {os.getpid(): "bench observer"}
    try:
        run.relay = Relay(out)
        roles[run.relay.pid] = "relay"
        run.observer = Observer(run.relay.url).start()
        perf = subprocess.Popen(["perf", "record", "-a", "-g", "-F", str(freq), "-o", str(out / "perf.data"),
                                 "--", "sleep", str(seconds)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        run.swarm = Swarm(out / "home", run.config())
        run.t_launch = time.monotonic()
        run.swarm.start("--count", str(count), wait_ready=False)
        print(f"ready: {run.wait_heartbeats(count, run.t_launch, timeout=120):.2f} s (under perf)")
        roles[run.sup_pid] = "supervisor"
        for pid in descendants(run.sup_pid):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            roles[pid] = "fork-server" if b"fork-server" in cmd else "daemon"
        perf.wait()
    finally:
        run.stop()
    return roles


def samples(data: Path):  # type: ignore[no-untyped-def]
    """(comm, pid, time, [frames]) per sample, innermost frame first."""
    text = subprocess.run(["perf", "script", "-i", str(data), "-F", "comm,pid,time,ip,sym"],
                          capture_output=True, text=True, check=True).stdout
    for block in text.split("\n\n"):
        lines = block.strip("\n").splitlines()
        if not lines:
            continue
        head = lines[0].split()
        frames = [(ln.strip().split(None, 1) + ["?"])[1] for ln in lines[1:]]
        yield head[0], int(head[1]), float(head[2].rstrip(":")), frames


def kind(frames: list[str]) -> str:
    s = set(frames)
    if "asm_exc_page_fault" in s:
        return "fault-cow" if "do_wp_page" in s else "fault"
    if "copy_process" in s:
        return "fork"
    if "do_exit" in s or "do_group_exit" in s:
        return "exit"
    if any(f.startswith("__x64_sys_") for f in frames):
        return "syscall"
    if any(f.startswith(("asm_", "ret_from_fork")) for f in frames):
        return "kernel-other"
    return "user"


def report(out: Path, roles: dict[int, str]) -> None:
    every = list(samples(out / "perf.data"))
    times = sorted(t for _, pid, t, _ in every if roles.get(pid) == "daemon")
    if not times:
        print("no daemon samples")
        return
    t0, t1 = times[0], times[int(len(times) * 0.97)]
    window = [s for s in every if t0 <= s[2] <= t1 and s[0] != "swapper"]
    print(f"spawn window {t1 - t0:.2f} s, {len(window)} busy samples")
    table: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    calls: collections.Counter[str] = collections.Counter()
    for comm, pid, _, frames in window:
        role = roles.get(pid, f"other ({comm})")
        table[role][kind(frames)] += 1
        if role == "daemon":
            call = next((f for f in frames if f.startswith("__x64_sys_")), None)
            if call:
                calls[call[10:]] += 1
    total = len(window)
    for role, kinds in sorted(table.items(), key=lambda kv: -sum(kv[1].values()))[:8]:
        share = 100 * sum(kinds.values()) / total
        print(f"  {role:16s} {share:5.1f} %  " +
              "  ".join(f"{k} {100 * v / total:.1f}" for k, v in kinds.most_common()))
    print("  daemon system calls: " + ", ".join(f"{c} {100 * n / total:.1f}" for c, n in calls.most_common(8)))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--freq", type=int, default=1000)
    args = parser.parse_args()
    if shutil.which("perf") is None:
        print("perf is not installed (Debian: apt install linux-perf)", file=sys.stderr)
        return 1
    print(byte_compile_package())  # as installed: see swarm_bench
    out = Path(tempfile.mkdtemp(prefix="profile-machine-", dir=default_scratch()))
    roles = record(args.count, args.seconds, args.freq, out)
    (out / "roles.json").write_text(json.dumps(roles))
    report(out, roles)
    print(f"raw data in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
