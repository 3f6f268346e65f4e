"""Where a forked daemon's boot time and private memory go.

Run:  python bench/profile_daemon.py [--daemons 20] [--cprofile] [--tracemalloc] [--phases]

This process plays supervisor and fork-server at once: it preloads exactly as the
fork-server does (``forkserver.preload()``, which ends in ``gc.freeze()``), then
forks real daemons (``apply_in_child`` + ``daemon.main_forked``) that boot over a
real IPC socketpair and connect to a real relay subprocess. It prints, per
daemon, the boot phases seen from the parent (fork -> hello -> ready on the
relay) and USS at each phase, the private memory of one idle daemon by mapping,
and optionally a cProfile of one daemon's boot and a tracemalloc top list of what
it allocated after the fork.
"""

from __future__ import annotations

import argparse
import os
import pstats
import re
import signal
import socket
import statistics
import struct
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from swarm_bench import Relay, smaps_rollup  # noqa: E402

from agentctl_swarm import ipc  # noqa: E402


def uss_kb(pid: int) -> int:
    r = smaps_rollup(pid)
    return r.get("Private_Clean", 0) + r.get("Private_Dirty", 0)


def boot_message(name: str, workdir: Path, url: str) -> dict[str, Any]:
    spec = {"name": name, "role": "general", "path": str(workdir / name), "channels": ["#agents"],
            "repo": None, "instructions": "", "swarm_id": str(workdir)}
    return {"t": "boot", "workspace": spec, "server": url, "channels": ["#agents"],
            "send_interval": 1.0, "heartbeat_interval": 30.0, "status_interval": 10.0,
            "max_task_duration": 1800.0, "shutdown_grace": 5.0, "agent_command": ["true"],
            "agent_env": {}, "coordinator_id": "", "cgroup": None, **_isolation(name)}


def _isolation(name: str) -> dict[str, Any]:
    """The sandbox spec and grants the supervisor would send with the default config."""
    from agentctl_swarm.config import load_config
    from agentctl_swarm.isolation import Isolation
    iso = Isolation.detect(load_config(None))
    return {"sandbox": iso.sandbox_spec(name, "general"), "grants": iso.env_grants(name, "general")}


def handed_fds(boot: dict[str, Any], workdir: Path) -> dict[str, int]:
    """What the supervisor hands a daemon (``spawner.handed_fds``): its Landlock ruleset
    and its relay connection, upgraded."""
    import asyncio
    from agentctl_swarm import spawner
    return asyncio.run(spawner.handed_fds(boot, workdir))


def child(fd: int, name: str, mode: str, out: Path, fds: dict[str, int]) -> None:
    """In the forked child: what the fork-server's _run_daemon does, plus the probe."""
    from agentctl_swarm import daemon, forkserver
    from agentctl_swarm.spawner import LaunchPlan, apply_in_child
    forkserver.AT_FORK.in_daemon()
    apply_in_child(LaunchPlan(name=name, keep_fds=(fd, *fds.values()), supervisor_pid=None))
    code = 1
    try:
        if mode == "cprofile":
            import cProfile
            prof = cProfile.Profile()
            code = prof.runcall(daemon.main_forked, fd, fds)
            prof.dump_stats(str(out))
        elif mode == "tracemalloc":
            import tracemalloc
            tracemalloc.start(8)

            def dump(*_: Any) -> None:
                snap = tracemalloc.take_snapshot()
                snap = snap.filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
                with out.open("w") as fh:
                    total = sum(s.size for s in snap.statistics("filename"))
                    fh.write(f"traced after fork: {total / 1024:.0f} kB\n")
                    for stat in snap.statistics("lineno")[:25]:
                        fh.write(f"{stat.size / 1024:8.1f} kB {stat.count:6d}  {stat.traceback[0]}\n")
            signal.signal(signal.SIGUSR2, dump)
            code = daemon.main_forked(fd, fds)
        else:
            code = daemon.main_forked(fd, fds)
    finally:
        os._exit(code)


def read_frame(sock: socket.socket) -> dict[str, Any]:
    header = sock.recv(4, socket.MSG_WAITALL)
    (length,) = struct.unpack(">I", header)
    return ipc.decode(sock.recv(length, socket.MSG_WAITALL))


def wait_for(sock: socket.socket, kind: str, timeout: float = 30.0) -> dict[str, Any]:
    sock.settimeout(timeout)
    while True:
        msg = read_frame(sock)
        if msg["t"] == kind:
            return msg


def by_mapping(pid: int) -> Counter[str]:
    """Private kB per mapping name (anonymous mappings pooled as [anon])."""
    agg: Counter[str] = Counter()
    name = "[anon]"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        parts = line.split()
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            name = parts[5].rsplit("/", 1)[-1] if len(parts) > 5 else "[anon]"
        elif parts[0] in ("Private_Dirty:", "Private_Clean:"):
            agg[name] += int(parts[1])
    return agg


def pagemap_report(pid: int) -> None:
    """Which of the parent's objects lie on the pages an idle daemon holds privately.

    Walks every object reachable from ``sys.modules`` in this (the parent's) heap, maps
    each to its 4 kB pages, then reads the child's /proc/PID/pagemap: a present page with
    the "exclusively mapped" bit (56) in [anon] or [heap] is one the child copied or
    allocated. Needs root (pagemap flags are hidden from others)."""
    import gc
    pages: dict[int, Counter[str]] = {}
    todo: list[Any] = list(sys.modules.values())
    seen: set[int] = set()
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        start, size = id(obj), max(sys.getsizeof(obj), 1)
        for page in range(start >> 12, ((start + size - 1) >> 12) + 1):
            pages.setdefault(page, Counter())[type(obj).__name__] += 1
        todo.extend(r for r in gc.get_referents(obj) if id(r) not in seen)
        code = getattr(obj, "__code__", None)
        if code is not None and id(code) not in seen:
            todo.append(code)
    import ctypes
    private, with_objects, same = 0, Counter(), 0
    holders: Counter[str] = Counter()
    with open(f"/proc/{pid}/pagemap", "rb") as fh, open(f"/proc/{pid}/mem", "rb") as mem:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            fields = line.split()
            if (fields[5] if len(fields) > 5 else "[anon]") not in ("[anon]", "[heap]"):
                continue
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            fh.seek((lo >> 12) * 8)
            data = fh.read(((hi - lo) >> 12) * 8)
            for i, (entry,) in enumerate(struct.iter_unpack("<Q", data)):
                if entry >> 63 and (entry >> 56) & 1:
                    private += 1
                    addr = lo + i * 4096
                    mem.seek(addr)  # copied, yet byte for byte what we (the parent) hold now?
                    same += mem.read(4096) == ctypes.string_at(addr, 4096)
                    types = pages.get((lo >> 12) + i)
                    with_objects["holds parent objects" if types else "no parent object"] += 1
                    holders.update(set(types or ()))
    print(f"private [anon]/[heap] pages of one idle daemon: {private} ({dict(with_objects)}); "
          f"parent objects walked: {len(seen)}; identical to the parent's page: {same} "
          "(written only by reference counts that came back, or rewritten with the same bytes)")
    for name, n in holders.most_common(12):
        print(f"  {n:6d} pages hold a {name}")


def floor_report() -> None:
    """USS of children of this preloaded image that run (almost) nothing: the floor."""
    steps = {"sleep only": "pass",
             "an asyncio event loop": "import asyncio; loop = asyncio.new_event_loop()",
             "asyncio.run(sleep(0))": "import asyncio; asyncio.run(asyncio.sleep(0))"}
    for label, code in steps.items():
        pid = os.fork()
        if pid == 0:
            exec(code)  # noqa: S102 - fixed snippets above
            time.sleep(60)
            os._exit(0)
        time.sleep(1.0)
        print(f"floor: a forked child that runs {label}: USS {uss_kb(pid) / 1024:.2f} MB")
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


# Where phases_report freezes a daemon: (label, object, attribute, "before"/"after").
# Each label's USS minus the previous one's is what that step of the boot adds.
PHASES = [("event loop and signal handlers", "Daemon", "_catch_stop_signals", "after"),
          ("IPC channel open, hello sent", "Daemon", "send_ipc", "after"),
          ("boot message received", "Daemon", "_ipc_boot", "after"),
          ("logging to the supervisor, title", "workspace", "prepare", "before"),
          ("workspace made, key generated", "Identity", "generate", "after"),
          ("key saved, workspace files written", "Daemon", "_prepare", "after"),
          ("Landlock confinement", "Daemon", "_confine", "after"),
          ("relay connected, identified, joined: ready", "Daemon", "_on_link_event", "after"),
          ("idle, 1 s later", None, None, None)]


def phases_report(relay_url: str, work: Path, reps: int = 3) -> None:
    """USS of forked daemons frozen at each step of the boot (medians of ``reps``).

    Each child is stopped at one point (it blocks on a pipe there) and measured from
    here; everything the parent does after forking is done before the fork (the boot
    message is built first), since a page the parent writes later is copied into the
    child and would count as the child's."""
    from agentctl_swarm import daemon, forkserver, workspace
    from agentctl_swarm.agentchat.identity import Identity
    from agentctl_swarm.spawner import LaunchPlan, apply_in_child
    owners = {"Daemon": daemon.Daemon, "workspace": workspace, "Identity": Identity}
    results: dict[str, list[float]] = {label: [] for label, *_ in PHASES}
    for rep in range(reps):
        for i, (label, owner, attr, when) in enumerate(PHASES):
            name = f"phase-{rep}-{i}"
            message = boot_message(name, work / "ws", relay_url)
            fds = handed_fds(message, work / "ws")
            boot = ipc.encode(message)
            stopped_r, stopped_w = os.pipe()
            hold_r, hold_w = os.pipe()
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            pid = os.fork()
            if pid == 0:
                ours.close()
                if owner is not None:
                    _stop_at(owners[owner], attr, when, stopped_w, hold_r)
                forkserver.AT_FORK.in_daemon()
                apply_in_child(LaunchPlan(name=name, keep_fds=(theirs.fileno(), stopped_w, hold_r,
                                                               *fds.values()), supervisor_pid=None))
                os._exit(daemon.main_forked(theirs.fileno(), fds))
            theirs.close()
            for fd in fds.values():
                os.close(fd)
            if i > 1:
                wait_for(ours, "hello")
                ours.sendall(boot)
            if owner is None:
                wait_for(ours, "ready")
                time.sleep(1.0)
            else:
                os.read(stopped_r, 1)
                time.sleep(0.2)
            results[label].append(uss_kb(pid) / 1024)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            for fd in (stopped_r, stopped_w, hold_r, hold_w):
                os.close(fd)
            ours.close()
    previous = None
    print("USS of a forked daemon stopped at each step of its boot (MB, median; + what the step adds):")
    for label, values in results.items():
        median = statistics.median(values)
        added = "" if previous is None else f"+{(median - previous) * 1024:5.0f} kB"
        print(f"  {median:6.2f}  {added:9s}  {label}")
        previous = median


def _stop_at(owner: Any, attr: str, when: str, stopped_w: int, hold_r: int) -> None:
    """In the child: block (for good) just before or after ``owner.attr`` runs."""
    original = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
    func = original.__func__ if isinstance(original, classmethod) else original

    def stop() -> None:
        os.write(stopped_w, b"x")
        os.read(hold_r, 1)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if when == "before":
            stop()
        result = func(*args, **kwargs)
        if when == "after":
            stop()
        return result
    setattr(owner, attr, classmethod(wrapper) if isinstance(original, classmethod) else wrapper)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--daemons", type=int, default=20)
    parser.add_argument("--cprofile", action="store_true", help="cProfile the first daemon's boot")
    parser.add_argument("--tracemalloc", action="store_true", help="tracemalloc in the first daemon")
    parser.add_argument("--pagemap", action="store_true",
                        help="which parent objects lie on an idle daemon's private pages (root)")
    parser.add_argument("--floor", action="store_true",
                        help="USS of forked children that only sleep / make an event loop")
    parser.add_argument("--phases", action="store_true",
                        help="USS of daemons stopped at each step of the boot (what each step adds)")
    args = parser.parse_args()
    mode = "cprofile" if args.cprofile else "tracemalloc" if args.tracemalloc else "plain"
    work = Path(tempfile.mkdtemp(prefix="profile-daemon-"))
    relay = Relay(work)
    t0 = time.perf_counter()
    from agentctl_swarm import forkserver
    forkserver.preload()
    print(f"preload (imports + warm-up + gc.freeze): {time.perf_counter() - t0:.3f} s, "
          f"parent USS {uss_kb(os.getpid()) / 1024:.1f} MB")
    if args.floor:
        floor_report()
    if args.phases:
        forkserver.AT_FORK.use_lean()  # as the fork-server serves
        phases_report(relay.url, work)
        relay.stop()
        return 0
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    forkserver.AT_FORK.use_lean()  # as the fork-server serves
    kids: list[tuple[int, socket.socket]] = []
    phases: dict[str, list[float]] = {"fork_ms": [], "hello_ms": [], "ready_ms": []}
    mem: dict[str, list[float]] = {"uss_at_hello_mb": [], "uss_at_ready_mb": [], "uss_idle_mb": []}
    try:
        for i in range(args.daemons):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            name = f"prof-{i:03d}"
            out = work / "ws" / name / f"profile.{mode}"  # the daemon Landlocks itself to its workspace
            message = boot_message(name, work / "ws", relay.url)
            fds = handed_fds(message, work / "ws")
            t_fork = time.perf_counter()
            pid = os.fork()
            if pid == 0:
                ours.close()
                child(theirs.fileno(), name, mode if i == 0 else "plain", out, fds)
            phases["fork_ms"].append((time.perf_counter() - t_fork) * 1000)
            theirs.close()
            for fd in fds.values():
                os.close(fd)
            wait_for(ours, "hello")
            phases["hello_ms"].append((time.perf_counter() - t_fork) * 1000)
            mem["uss_at_hello_mb"].append(uss_kb(pid) / 1024)
            ours.sendall(ipc.encode(message))
            wait_for(ours, "ready")
            phases["ready_ms"].append((time.perf_counter() - t_fork) * 1000)
            mem["uss_at_ready_mb"].append(uss_kb(pid) / 1024)
            kids.append((pid, ours))
        time.sleep(3)
        for pid, _ in kids:
            mem["uss_idle_mb"].append(uss_kb(pid) / 1024)
        for key, values in {**phases, **mem}.items():
            print(f"{key:18s} median {statistics.median(values):8.2f}  max {max(values):8.2f}")
        if args.pagemap:
            pagemap_report(kids[-1][0])
        print("private memory of one idle daemon by mapping (kB):")
        for name, kb in by_mapping(kids[-1][0]).most_common(8):
            print(f"  {kb:7d}  {name}")
        if mode == "tracemalloc":
            os.kill(kids[0][0], signal.SIGUSR2)
            time.sleep(1)
            print((work / "ws" / "prof-000" / "profile.tracemalloc").read_text())
    finally:
        for pid, sock in kids:
            os.kill(pid, signal.SIGTERM)
        for pid, sock in kids:
            os.waitpid(pid, 0)
            sock.close()
        relay.stop()
    if mode == "cprofile":
        stats = pstats.Stats(str(work / "ws" / "prof-000" / "profile.cprofile"))
        stats.sort_stats("cumulative").print_stats(40)
    return 0


if __name__ == "__main__":
    sys.exit(main())
