"""Where a forked daemon's boot time and private memory go.

Run:  python bench/profile_daemon.py [--daemons 20] [--cprofile] [--tracemalloc] [--phases]
                                     [--floor] [--pagemap] [--faults]

This process plays supervisor and fork-server at once: it preloads exactly as the
fork-server does (``forkserver.preload()``, which ends in ``gc.freeze()``), then
forks real daemons (``apply_in_child`` + ``daemon.main_forked``) that boot over a
real IPC socketpair and connect to a real relay subprocess. It prints, per
daemon, the boot phases seen from the parent (fork -> hello -> ready on the
relay) and USS at each phase, the private memory of one idle daemon by mapping,
and optionally a cProfile of one daemon's boot and a tracemalloc top list of what
it allocated after the fork.

``--pagemap`` and ``--faults`` (root; ``--faults`` also needs ``perf``) say which of
the parent's objects the last daemon wrote to: the pages it holds privately
compared word by word with the parent's memory at its fork, and, for every page
it copied, the object that its first write hit.
"""

from __future__ import annotations

import argparse
import gc
import os
import pstats
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import types
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from swarm_bench import Relay, byte_compile_package, smaps_rollup  # noqa: E402

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
                    peak = tracemalloc.get_traced_memory()[1]
                    fh.write(f"traced after fork: {total / 1024:.0f} kB (peak {peak / 1024:.0f} kB)\n")
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


def walk_objects() -> list[tuple[int, int, Any]]:
    """(start, end, object) of every object reachable from ``sys.modules`` in this heap
    (the parent's: a forked daemon starts with the same addresses), sorted."""
    import gc
    todo: list[Any] = list(sys.modules.values())
    seen: dict[int, tuple[int, int, Any]] = {}
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen[id(obj)] = (id(obj), id(obj) + max(sys.getsizeof(obj), 1), obj)
        todo.extend(r for r in gc.get_referents(obj) if id(r) not in seen)
        code = getattr(obj, "__code__", None)
        if code is not None and id(code) not in seen:
            todo.append(code)
    return sorted(seen.values(), key=lambda span: span[0])


def _object_at(spans: list[tuple[int, int, Any]], starts: list[int], addr: int) -> tuple[Any, bool] | None:
    """The walked object holding ``addr``, and whether ``addr`` is its reference count."""
    import bisect
    i = bisect.bisect_right(starts, addr) - 1
    if i >= 0 and spans[i][0] <= addr < spans[i][1]:
        return spans[i][2], addr == spans[i][0]
    return None


def _kind(obj: Any, refcount: bool) -> str:
    return f"{type(obj).__name__} {'refcount' if refcount else 'body'}"


def pagemap_report(pid: int, twin: int, spans: list[tuple[int, int, Any]]) -> None:
    """Which of the parent's objects an idle daemon wrote on the pages it holds privately.

    Reads the daemon's /proc/PID/pagemap: a present page with the "exclusively
    mapped" bit (56) in [anon] or [heap] is one it copied or allocated. Each such
    page is compared with the same page of ``twin``, a child forked just before
    the daemon that stopped at once (the parent's memory as the daemon started
    with it): identical pages were written only by reference counts that came
    back; on the others, each differing word is put down to the walked object
    that holds it. Needs root (pagemap flags are hidden from others)."""
    starts = [span[0] for span in spans]
    private, same = 0, 0
    written: Counter[str] = Counter()
    with open(f"/proc/{pid}/pagemap", "rb") as fh, open(f"/proc/{pid}/mem", "rb") as mem, \
            open(f"/proc/{twin}/mem", "rb") as then:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            fields = line.split()
            if (fields[5] if len(fields) > 5 else "[anon]") not in ("[anon]", "[heap]"):
                continue
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            fh.seek((lo >> 12) * 8)
            data = fh.read(((hi - lo) >> 12) * 8)
            for i, (entry,) in enumerate(struct.iter_unpack("<Q", data)):
                if not (entry >> 63 and (entry >> 56) & 1):
                    continue
                private += 1
                addr = lo + i * 4096
                mem.seek(addr)
                now = mem.read(4096)
                try:
                    then.seek(addr)
                    before = then.read(4096)
                except OSError:  # not mapped in the parent: memory the daemon mapped itself
                    written["new memory"] += 1
                    continue
                if now == before:
                    same += 1
                    continue
                kinds = set()
                for off in range(0, 4096, 8):
                    if now[off:off + 8] != before[off:off + 8]:
                        hit = _object_at(spans, starts, addr + off)
                        kinds.add(_kind(*hit) if hit else
                                  "no walked object (allocator, freed blocks, new objects)")
                written.update(kinds)
    print(f"private [anon]/[heap] pages of one idle daemon: {private}; identical to the "
          f"parent's page at the fork: {same} (written only by reference counts that came back)")
    print("the other pages, by the kinds of object whose words differ (a page counts once "
          "for each kind on it):")
    for name, n in written.most_common(20):
        print(f"  {n:6d} {name}")


def _label(obj: Any) -> str:
    """A name for an object a fault was put down to."""
    kind = type(obj).__name__
    if isinstance(obj, types.ModuleType):
        return f"module {obj.__name__}"
    if isinstance(obj, types.FunctionType):
        from agentctl_swarm import forkserver
        copied = any(obj is copy for copy in forkserver._CLONES.values())
        return f"function {obj.__qualname__} ({'packed copy' if copied else 'original'})"
    if isinstance(obj, type):
        return f"class {obj.__qualname__}"
    if isinstance(obj, str):
        return f"str {obj[:40]!r}"
    return kind


def faults_report(pid: int, perf_data: Path, spans: list[tuple[int, int, Any]]) -> None:
    """The first write to each page a daemon copies faults once: ``perf record -e
    page-faults -d`` gives that write's address, put down here to the object it hit."""
    starts = [span[0] for span in spans]
    out = subprocess.run(["perf", "script", "-i", str(perf_data), "-F", "pid,addr"],
                         capture_output=True, text=True, check=True).stdout
    kinds: Counter[str] = Counter()
    labels: dict[str, Counter[str]] = {}
    faults = 0
    for line in out.splitlines():
        parts = line.split()
        if len(parts) != 2 or parts[0] != str(pid):
            continue
        faults += 1
        hit = _object_at(spans, starts, int(parts[1], 16))
        kind = _kind(*hit) if hit else "no walked object (new memory, libpython's data, stack)"
        kinds[kind] += 1
        if hit:
            labels.setdefault(kind, Counter())[_label(hit[0])] += 1
    print(f"page faults of one daemon from its fork to idle (the first touch of a page): {faults}")
    for kind, n in kinds.most_common(20):
        examples = ", ".join(label for label, _ in labels.get(kind, Counter()).most_common(4))
        print(f"  {n:5d} {kind}{'  e.g. ' + examples if examples else ''}")


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
    print(byte_compile_package())  # as installed: see swarm_bench
    parser = argparse.ArgumentParser()
    parser.add_argument("--daemons", type=int, default=20)
    parser.add_argument("--cprofile", action="store_true", help="cProfile the first daemon's boot")
    parser.add_argument("--tracemalloc", action="store_true", help="tracemalloc in the first daemon")
    parser.add_argument("--pagemap", action="store_true",
                        help="which parent objects lie on an idle daemon's private pages (root)")
    parser.add_argument("--faults", action="store_true",
                        help="what the first write to each page a daemon copies hit (root, perf)")
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
    twin = 0  # --pagemap: the parent's memory as the last daemon starts with it
    perf_data = work / "faults.data"
    phases: dict[str, list[float]] = {"fork_ms": [], "hello_ms": [], "ready_ms": []}
    mem: dict[str, list[float]] = {"uss_at_hello_mb": [], "uss_at_ready_mb": [], "uss_idle_mb": []}
    try:
        # What the supervisor hands each daemon is made first, and the heap's holes
        # filled again: the fork-server does nothing between two forks but fork.
        handed = []
        for i in range(args.daemons):
            message = boot_message(f"prof-{i:03d}", work / "ws", relay.url)
            handed.append((message, ipc.encode(message), handed_fds(message, work / "ws")))
        gc.collect()
        forkserver.fill_free_blocks()
        for i, (message, boot, fds) in enumerate(handed):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            name = message["workspace"]["name"]
            out = work / "ws" / name / f"profile.{mode}"  # the daemon Landlocks itself to its workspace
            last = i == args.daemons - 1
            perf = None
            if last and args.faults:
                perf = subprocess.Popen(["perf", "record", "-q", "-a", "-e", "page-faults", "-c", "1",
                                         "-d", "-o", str(perf_data)], stdout=subprocess.DEVNULL)
                time.sleep(1.5)  # perf is recording
            if last and (args.pagemap or args.faults):
                twin = os.fork()
                if twin == 0:
                    os.kill(os.getpid(), signal.SIGSTOP)
                    os._exit(0)
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
            ours.sendall(boot)
            wait_for(ours, "ready")
            if perf is not None:
                time.sleep(1.0)
                perf.send_signal(signal.SIGINT)
                perf.wait()
            phases["ready_ms"].append((time.perf_counter() - t_fork) * 1000)
            mem["uss_at_ready_mb"].append(uss_kb(pid) / 1024)
            kids.append((pid, ours))
        time.sleep(3)
        for pid, _ in kids:
            mem["uss_idle_mb"].append(uss_kb(pid) / 1024)
        for key, values in {**phases, **mem}.items():
            print(f"{key:18s} median {statistics.median(values):8.2f}  max {max(values):8.2f}")
        if args.pagemap or args.faults:
            spans = walk_objects()
            if args.pagemap:
                pagemap_report(kids[-1][0], twin, spans)
            if args.faults:
                faults_report(kids[-1][0], perf_data, spans)
        print("private memory of one idle daemon by mapping (kB):")
        for name, kb in by_mapping(kids[-1][0]).most_common(8):
            print(f"  {kb:7d}  {name}")
        if mode == "tracemalloc":
            os.kill(kids[0][0], signal.SIGUSR2)
            time.sleep(1)
            print((work / "ws" / "prof-000" / "profile.tracemalloc").read_text())
    finally:
        if twin:
            os.kill(twin, signal.SIGKILL)
            os.waitpid(twin, 0)
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
