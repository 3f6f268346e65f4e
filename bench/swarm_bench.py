"""Swarm benchmark: ready time, memory, idle CPU, recovery, reload and scale.

Run:  python bench/swarm_bench.py [--quick] [--sizes 10,100,500] [--reps 3]
                                  [--spawn fork-server,exec]
                                  [--peers supervisord,supervisord-python3]
                                  [--big 1000] [--out FILE.json]

Design note
-----------
Every figure is taken from outside the supervisor, the way a user sees it:

* **Ready** is measured at the relay. The benchmark starts the relay itself
  (``python -m agentctl_swarm.agentchat.relay``, the very argv and rate limit the
  supervisor uses for ``agentchat.server: embedded``) and joins ``#agents`` with
  its own observer (an ``AgentChatClient`` with a fresh identity) *before* it
  launches ``agentctl swarm start --count N``; the swarm's config points
  ``agentchat.server`` at that relay. The relay replays only its last 50
  channel lines to a joiner, so an observer that joined after the supervisor had
  started its own relay would miss first heartbeats (the next come up to 30 s
  later). Ready = launch -> N distinct
  senders of ``HEARTBEAT`` lines, i.e. identified, joined and heartbeating.
* **Memory** is ``/proc/PID/smaps_rollup``: USS = Private_Clean + Private_Dirty,
  PSS as reported; the swarm total is supervisor + its descendants (fork-server,
  daemons) + the relay.
* **CPU** is the scheduler's own count of time on a CPU, ``/proc/PID/schedstat``
  (nanoseconds), over a window of idle time; utime+stime from ``/proc/PID/stat``
  is shown next to it for the idle figures. The latter is sampled at clock ticks,
  and a process that runs in bursts shorter than a tick is undercounted: measured
  here, a forked daemon's boot is 17 ms by schedstat and 5-8 ms by stat.
* **Recovery** is kill -9 of one daemon -> its replacement's first HEARTBEAT at
  the observer, minus the 1 s backoff of a first restart; 20 *different* daemons
  are killed, so no agent nears the degraded threshold (> 5 restarts / 30 min).
* **Reload** is SIGHUP -> the ``config reloaded`` line's own timestamp in
  ``supervisor.log`` (both wall-clock, ms precision); the file changes
  ``max-active`` and ``heartbeat-interval``, so the reload pushes a ``set`` to
  every daemon over IPC (the expensive case).
* **Scale** is ``agentctl swarm scale M`` (the real CLI, its Python start
  included) -> all M heartbeating at the observer (up) or only M daemon
  processes left (down).

The peer is supervisord (PyPI, in the benchmark's own venv) with N bare
``python -c`` children (numprocs=N, startsecs=0),
timed from its launch to all N children running their code (each writes a byte
to a FIFO, then sleeps); the time until supervisord reports them all RUNNING is
kept as ``running_s`` (with startsecs=0 that is when it has spawned them, before
their interpreter is up). Two peers differ only in that interpreter:
``supervisord`` runs the swarm's own binary (``sys.executable``, the fair
comparison), ``supervisord-python3`` runs ``python3`` as a login shell finds it,
which is how the issue's reference figures were taken (on these machines a pyenv
shim that costs ~95 ms a start).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from agentctl_swarm.agentchat.client import AgentChatClient  # noqa: E402
from agentctl_swarm.agentchat.identity import Identity  # noqa: E402
from agentctl_swarm.control.client import call as control_call  # noqa: E402
from agentctl_swarm.system import proc  # noqa: E402
from tests.swarmlib import Swarm, fake_agent_command, swarm_processes  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
MIN_AVAILABLE_MB = 4096  # abort a run before it can push the machine into the OOM killer
SCALE_TIMEOUT_S = 180.0  # exec on a slow day took 51-65 s to add 400 daemons


# ---------------------------------------------------------------- /proc readers
def smaps_rollup(pid: int) -> dict[str, int]:
    """kB fields of /proc/PID/smaps_rollup (empty if the process is gone)."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return out
    for line in text.splitlines()[1:]:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0])
    return out


def memory_of(pids: list[int]) -> dict[str, float]:
    """Median USS/PSS (MB) across ``pids`` and their total PSS."""
    rows = [smaps_rollup(p) for p in pids]
    rows = [r for r in rows if r]
    if not rows:
        return {}
    uss = [(r.get("Private_Clean", 0) + r.get("Private_Dirty", 0)) / 1024 for r in rows]
    pss = [r.get("Pss", 0) / 1024 for r in rows]
    return {"uss_mb": statistics.median(uss), "pss_mb": statistics.median(pss),
            "pss_sum_mb": sum(pss), "n_measured": len(rows)}


def cpu_seconds(pid: int) -> float:
    """Time ``pid`` has spent on a CPU, exact (``/proc/PID/schedstat``, ns); falls back
    to ``cpu_ticks`` on a kernel without schedstat. 0 if gone."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    except FileNotFoundError:
        return cpu_ticks(pid) / CLK_TCK if Path(f"/proc/{pid}").exists() else 0.0
    except (OSError, ValueError, IndexError):
        return 0.0


def cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` in clock ticks (0 if gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # fields 14, 15 of proc(5)


def children_map() -> dict[int, list[int]]:
    """ppid -> pids, for every process."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    tree, out, todo = children_map(), [], [pid]
    while todo:
        kids = tree.get(todo.pop(), [])
        out.extend(kids)
        todo.extend(kids)
    return out


def mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# ---------------------------------------------------------------- the observer
class _Watch:
    """A waiter on the observer: the first heartbeat at or after ``since`` of each name
    ``accept`` takes, until there are ``count`` of them."""

    def __init__(self, since: float, count: int, accept: Callable[[str], bool]) -> None:
        self.since, self.count, self.accept = since, count, accept
        self.first: dict[str, float] = {}

    def add(self, name: str, when: float) -> bool:
        """Note one heartbeat; True when this one completes the count."""
        if when < self.since or name in self.first or not self.accept(name):
            return False
        self.first[name] = when
        return len(self.first) == self.count


class Observer:
    """Our own agentchat client on #agents, in a thread: who heartbeat, and when.

    Waiting is event-driven (``wait_senders``): the observer's thread wakes the waiter
    when the heartbeat it waits for arrives, as supervisord's peer waits in ``select``
    on its FIFO; the benchmark does not poll the observer while the swarm starts."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.beats: dict[str, list[float]] = {}
        self.lock = threading.Lock()
        self.arrived = threading.Condition(self.lock)
        self.watches: list[_Watch] = []
        self.loop = asyncio.new_event_loop()
        self.client: AgentChatClient | None = None
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> "Observer":
        self.thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._connect(), self.loop)
        if not fut.result(30):
            raise RuntimeError(f"observer could not join #agents on {self.url}")
        return self

    async def _connect(self) -> bool:
        self.client = AgentChatClient(self.url, Identity.generate("bench-observer"), ["#agents"],
                                      on_message=self._on_message, send_interval=1.0,
                                      keepalive=None)  # no ping timeouts under load: loopback
        self.loop.create_task(self.client.run())
        return await self.client.wait_connected(20)

    def _on_message(self, frame: dict[str, Any]) -> None:
        content = frame.get("content")
        if isinstance(content, str) and content.startswith("HEARTBEAT "):
            now = time.monotonic()
            name = content.split()[1]
            with self.lock:
                self.beats.setdefault(name, []).append(now)
                if any([watch.add(name, now) for watch in self.watches]):
                    self.arrived.notify_all()

    def reset(self) -> None:
        with self.lock:
            self.beats.clear()

    def senders_since(self, t0: float) -> dict[str, float]:
        """name -> first heartbeat at or after t0."""
        with self.lock:
            return self._senders_since(t0)

    def _senders_since(self, t0: float) -> dict[str, float]:
        out = {}
        for name, times in self.beats.items():
            later = [t for t in times if t >= t0]
            if later:
                out[name] = later[0]
        return out

    def wait_senders(self, since: float, count: int, timeout: float,
                     accept: Callable[[str], bool] = lambda name: True,
                     check: Callable[[], None] = lambda: None) -> dict[str, float]:
        """Block until ``count`` names that ``accept`` takes heartbeat at or after
        ``since``; returns name -> first such heartbeat. ``check`` runs every 0.1 s
        meanwhile (it may raise); TimeoutError after ``timeout`` s."""
        watch = _Watch(since, count, accept)
        deadline = time.monotonic() + timeout
        with self.lock:
            for name, when in self._senders_since(since).items():  # those already here
                watch.add(name, when)
            self.watches.append(watch)
        try:
            while True:
                with self.lock:
                    if len(watch.first) < count:
                        self.arrived.wait(max(0.0, min(deadline - time.monotonic(), 0.1)))
                    if len(watch.first) >= count:
                        return dict(watch.first)
                    seen = len(watch.first)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"only {seen}/{count} daemons heartbeat within {timeout:.0f}s")
                check()
        finally:
            with self.lock:
                self.watches.remove(watch)

    def stop(self) -> None:
        if self.client is not None:
            asyncio.run_coroutine_threadsafe(self.client.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class Relay:
    """The relay, started by us exactly as the supervisor starts the embedded one."""

    def __init__(self, workdir: Path, rate_limit: float = 1.0) -> None:
        self.port_file = workdir / "relay.port"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agentctl_swarm.agentchat.relay", "--host", "127.0.0.1",
             "--port", "0", "--rate-limit", str(rate_limit), "--port-file", str(self.port_file)],
            stdout=subprocess.DEVNULL, stderr=open(workdir / "relay.stderr", "ab"),
            start_new_session=True)
        deadline = time.monotonic() + 20
        while not self.port_file.exists() or not self.port_file.read_text().strip():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("relay did not start")
            time.sleep(0.02)
        self.url = f"ws://127.0.0.1:{int(self.port_file.read_text())}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# ---------------------------------------------------------------- one swarm run
@dataclass
class Run:
    """One supervisor with its relay and observer, in a fresh HOME."""

    mode: str
    count: int
    base: Path
    relay: Relay | None = None
    observer: Observer | None = None
    swarm: Swarm | None = None
    t_launch: float = 0.0
    ready_timeout: float = 60.0
    notes: list[str] = field(default_factory=list)
    extra_config: dict[str, Any] = field(default_factory=dict)

    def config(self, **more: Any) -> dict[str, Any]:
        cfg: dict[str, Any] = {"count": self.count, "spawn": self.mode,
                               "agentchat": {"server": self.relay.url if self.relay else "embedded"},
                               "agent": {"command": fake_agent_command()},
                               "shutdown-grace": "5s"}
        cfg.update(self.extra_config)
        cfg.update(more)
        return cfg

    def start(self) -> float:
        """Launch ``agentctl swarm start --count N``; return seconds until all N heartbeat."""
        home = Path(tempfile.mkdtemp(prefix=f"swarm-{self.mode}-{self.count}-", dir=self.base))
        self.relay = Relay(home)
        self.observer = Observer(self.relay.url).start()
        self.swarm = Swarm(home, self.config())
        self.t_launch = time.monotonic()
        self.swarm.start("--count", str(self.count), wait_ready=False)
        return self.wait_heartbeats(self.count, self.t_launch, timeout=self.ready_timeout)

    def wait_heartbeats(self, count: int, since: float, timeout: float) -> float:
        """Seconds from ``since`` to the ``count``-th daemon's first heartbeat after it."""
        assert self.observer is not None and self.swarm is not None
        seen = self.observer.wait_senders(since, count, timeout, check=self._still_fine)
        return sorted(seen.values())[count - 1] - since

    def _still_fine(self) -> None:
        assert self.swarm is not None
        self.swarm.check_alive()
        if mem_available_mb() < MIN_AVAILABLE_MB:
            raise MemoryError(f"MemAvailable below {MIN_AVAILABLE_MB} MB; aborted")

    def status(self) -> dict[str, Any]:
        assert self.swarm is not None
        return control_call(self.swarm.home / ".agentctl" / "run" / "control.sock", "status")

    @property
    def sup_pid(self) -> int:
        assert self.swarm is not None and self.swarm.proc is not None
        return self.swarm.proc.pid

    def daemon_pids(self) -> list[int]:
        return [a["pid"] for a in self.status()["agents"] if a["pid"]]

    def helper_pids(self) -> list[int]:
        daemons = set(self.daemon_pids())
        return [p for p in descendants(self.sup_pid) if p not in daemons]

    def memory(self) -> dict[str, float]:
        assert self.relay is not None
        daemons = self.daemon_pids()
        mem = memory_of(daemons)
        everything = [self.sup_pid, self.relay.pid, *descendants(self.sup_pid)]
        mem["total_pss_mb"] = sum(smaps_rollup(p).get("Pss", 0) for p in everything) / 1024
        mem["supervisor_pss_mb"] = smaps_rollup(self.sup_pid).get("Pss", 0) / 1024
        mem["relay_pss_mb"] = smaps_rollup(self.relay.pid).get("Pss", 0) / 1024
        return mem

    def cpu_groups(self) -> dict[str, list[int]]:
        assert self.relay is not None
        return {"supervisor": [self.sup_pid], "daemons": self.daemon_pids(),
                "helpers": self.helper_pids(), "relay": [self.relay.pid]}

    def boot_cpu(self) -> dict[str, float]:
        """CPU seconds each part has used since launch (at ready: what booting cost)."""
        return {f"boot_cpu_{k}_s": sum(cpu_seconds(p) for p in v) for k, v in self.cpu_groups().items()}

    def boot_phases(self, n: int) -> dict[str, float]:
        """Median ms of each boot phase over the first ``n`` starts, from the supervisor's
        "<agent> ready in T ms (...)" records (fields ``boot_ms`` and ``phases_ms``)."""
        assert self.swarm is not None
        log = self.swarm.home / ".agentctl" / "logs" / "supervisor.log"
        phases: dict[str, list[float]] = {}
        try:
            lines = [json.loads(line) for line in log.open() if '"event": "boot"' in line][:n]
        except (OSError, ValueError):
            return {}
        for entry in lines:
            for name, value in {"total": entry["boot_ms"], **entry["phases_ms"]}.items():
                phases.setdefault(name, []).append(float(value))
        return {f"boot_ms_{k}": statistics.median(v) for k, v in phases.items()}

    def fallbacks(self) -> int:
        """Daemons the fork-server failed to start (the supervisor then exec'd them)."""
        assert self.swarm is not None
        log = self.swarm.home / ".agentctl" / "logs" / "supervisor.log"
        try:
            return sum(1 for line in log.open() if "fork-server could not start" in line)
        except OSError:
            return -1

    def idle_cpu(self, seconds: float) -> dict[str, float]:
        """Percent of one core over ``seconds`` for the supervisor, the daemons, the rest."""
        groups = self.cpu_groups()
        before = {k: sum(cpu_seconds(p) for p in v) for k, v in groups.items()}
        ticks = {k: sum(cpu_ticks(p) for p in v) for k, v in groups.items()}
        time.sleep(seconds)
        after = {k: sum(cpu_seconds(p) for p in v) for k, v in groups.items()}
        result = {f"cpu_{k}_pct": 100.0 * (after[k] - before[k]) / seconds for k in groups}
        for k, v in groups.items():
            result[f"cpu_{k}_stat_pct"] = 100.0 * (sum(cpu_ticks(p) for p in v) - ticks[k]) / CLK_TCK / seconds
        return result

    def stop(self) -> None:
        """Stop the swarm, relay and observer; report leftovers."""
        home = self.swarm.home if self.swarm else None
        for step in (self._stop_swarm, self._stop_observer, self._stop_relay):
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - clean up the rest regardless
                self.notes.append(f"cleanup: {type(exc).__name__}: {exc}")
        if home is not None:
            left = swarm_processes(home)
            if left:
                self.notes.append(f"left processes {left}; killing them")
                for pid in left:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass

    def _stop_swarm(self) -> None:
        if self.swarm is not None:
            try:
                self.swarm.stop(timeout=60)
            finally:
                self.swarm.kill()

    def _stop_observer(self) -> None:
        if self.observer is not None:
            self.observer.stop()

    def _stop_relay(self) -> None:
        if self.relay is not None:
            self.relay.stop()


# ---------------------------------------------------------------- scenarios
def recovery(run: Run, kills: int, backoff: float = 1.0) -> list[float]:
    """kill -9 ``kills`` different daemons one after another; seconds beyond the backoff."""
    assert run.observer is not None
    agents = [a for a in run.status()["agents"] if a["pid"] and a["status"] == "idle"]
    results = []
    for agent in agents[:kills]:
        t_kill = time.monotonic()
        os.kill(agent["pid"], signal.SIGKILL)
        back = run.observer.wait_senders(t_kill, 1, 30, accept=lambda name: name == agent["name"])
        results.append(back[agent["name"]] - t_kill - backoff)
    return results


def reload_latency(run: Run, reps: int) -> list[float]:
    """SIGHUP -> the ``config reloaded`` line's timestamp, seconds; alternates the change."""
    assert run.swarm is not None
    log = run.swarm.home / ".agentctl" / "logs" / "supervisor.log"
    out = []
    for i in range(reps):
        run.swarm.write_config(run.config(**{"max-active": 6 + i, "heartbeat-interval": f"{29 - i}s"}))
        offset = log.stat().st_size
        t_wall = time.time()
        run.swarm.signal(signal.SIGHUP)
        out.append(_wait_log_line(log, offset, "config reloaded", 10) - t_wall)
        time.sleep(0.5)
    run.swarm.write_config(run.config())
    run.swarm.signal(signal.SIGHUP)
    time.sleep(0.5)
    return out


def _wait_log_line(log: Path, offset: int, needle: str, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with log.open() as fh:
            fh.seek(offset)
            for line in fh:
                if needle in line:
                    ts = json.loads(line)["ts"].replace("Z", "+00:00")
                    return datetime.fromisoformat(ts).timestamp()
        time.sleep(0.005)
    raise TimeoutError(f"no {needle!r} line in {log} within {timeout}s")


def scale_up(run: Run, target: int) -> float:
    assert run.swarm is not None
    t0 = time.monotonic()
    assert run.observer is not None
    with run.observer.lock:
        before = set(run.observer.beats)
    run.swarm.cli("swarm", "scale", str(target))
    try:
        new = run.observer.wait_senders(t0, target - len(before), SCALE_TIMEOUT_S,
                                        accept=lambda name: name not in before)
    except TimeoutError as exc:
        raise TimeoutError(f"scale up to {target}: {exc}") from None
    return max(new.values()) - t0


def scale_down(run: Run, target: int) -> float:
    assert run.swarm is not None
    pids = run.daemon_pids()
    t0 = time.monotonic()
    run.swarm.cli("swarm", "scale", str(target))
    deadline = t0 + SCALE_TIMEOUT_S
    while True:
        left = [p for p in pids if alive(p)]
        if len(left) <= target:
            return time.monotonic() - t0
        if time.monotonic() > deadline:
            raise TimeoutError(f"scale down: {len(left)} daemons still alive after {SCALE_TIMEOUT_S:.0f} s")
        time.sleep(0.01)


# ---------------------------------------------------------------- the plan
@dataclass
class Options:
    sizes: list[int]
    reps: int
    modes: list[str]
    peers: list[str]
    big: int
    cpu_window: float
    kills: int
    quick: bool
    ready_timeout: float
    rep_offset: int = 0
    scratch: str | None = None
    ksm_seconds: float = 0.0
    ksm_scans: tuple[int, ...] = ()


def bench_size(mode: str, n: int, rep: int, opts: Options, base: Path) -> dict[str, Any]:
    """One fresh swarm of ``n``: ready, memory and, at 100 on rep 0, the extra scenarios."""
    run = Run(mode, n, base, ready_timeout=opts.ready_timeout or max(60.0, n * 0.5))
    row: dict[str, Any] = {"mode": mode, "n": n, "rep": rep}
    try:
        row["ready_s"] = run.start()
        row.update(run.boot_cpu())
        row.update(run.boot_phases(n))
        time.sleep(2.0)  # let the boot transients (first status, health sample) pass
        row.update(run.memory())
        if n == 100 and rep == 0:
            row.update(run.idle_cpu(opts.cpu_window))
            _scenario(row, "recovery_s", lambda: recovery(run, opts.kills))
        if n == 100:
            _scenario(row, "scale_up_s", lambda: scale_up(run, 500))
            row["daemons_at_reload"] = len(run.daemon_pids())
            _scenario(row, "reload_s", lambda: reload_latency(run, 3 if rep == 0 else 1))
            _scenario(row, "scale_down_s", lambda: scale_down(run, 100))
        if n == opts.big and rep == 0:
            row.update(run.idle_cpu(opts.cpu_window))
    except Exception as exc:  # noqa: BLE001 - a failed size is reported, not fatal
        row["error"] = f"{type(exc).__name__}: {exc}"
        if run.swarm is not None:
            row["error"] += run.swarm.tail(15)
    finally:
        if mode == "fork-server":
            row["forkserver_fallbacks"] = run.fallbacks()
        run.stop()
        row["notes"] = run.notes
    return row


def _scenario(row: dict[str, Any], key: str, fn: Callable[[], Any]) -> None:
    """Run one scenario; a failure is recorded in the row and the next one still runs."""
    try:
        row[key] = fn()
    except Exception as exc:  # noqa: BLE001
        row.setdefault("scenario_errors", []).append(f"{key}: {type(exc).__name__}: {exc}")


KSM = proc.KSM_RUN.parent  # /sys/kernel/mm/ksm


def _ksmd_seconds() -> float:
    """CPU time of the kernel's ksmd thread so far (schedstat), 0 if there is none."""
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == "ksmd":
                return cpu_seconds(int(entry.name))
        except OSError:
            continue
    return 0.0


def bench_ksm(n: int, seconds: float, scan: int, base: Path) -> dict[str, Any]:
    """``merge-pages: true`` with KSM switched on at ``scan`` pages per 20 ms: the idle
    daemons' USS/PSS and ksmd's CPU at intervals over ``seconds``. Needs root; the
    machine's KSM settings are restored (and every merged page unmerged) afterwards."""
    row: dict[str, Any] = {"mode": f"ksm-{scan}", "n": n, "rep": 0, "samples": []}
    knobs = ("run", "pages_to_scan", "sleep_millisecs")
    try:
        saved = {k: (KSM / k).read_text().strip() for k in knobs}
        (KSM / "pages_to_scan").write_text(str(scan))
        (KSM / "sleep_millisecs").write_text("20")
        (KSM / "run").write_text("1")
    except OSError as exc:
        row["error"] = f"KSM cannot be switched on here ({exc}); run as root on Linux 6.4+"
        return row
    run = Run("fork-server", n, base, ready_timeout=max(60.0, n * 0.5),
              extra_config={"merge-pages": True})
    try:
        row["ready_s"] = run.start()
        t0, c0 = time.monotonic(), _ksmd_seconds()
        for at in [t for t in (10, 30, 60, 120, 180, 300, 600) if t < seconds] + [seconds]:
            time.sleep(max(0.0, at - (time.monotonic() - t0)))
            mem = run.memory()
            elapsed = time.monotonic() - t0
            row["samples"].append({
                "t_s": round(elapsed), "uss_mb": mem["uss_mb"], "pss_mb": mem["pss_mb"],
                "total_pss_mb": mem["total_pss_mb"],
                "ksmd_pct": 100.0 * (_ksmd_seconds() - c0) / elapsed,
                "pages_sharing": int((KSM / "pages_sharing").read_text())})
            print(f"    ksm {scan}: {json.dumps(row['samples'][-1])}", file=sys.stderr, flush=True)
    except Exception as exc:  # noqa: BLE001
        row["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        run.stop()
        (KSM / "run").write_text("2")  # unmerge everything, then as it was
        for k in ("pages_to_scan", "sleep_millisecs", "run"):
            (KSM / k).write_text(saved[k])
    return row


def bench_peer(peer: str, n: int, rep: int) -> dict[str, Any]:
    from supervisord_peer import PEER_PYTHON, PeerUnavailable, ensure_venv, run_peer
    row: dict[str, Any] = {"mode": peer, "n": n, "rep": rep}
    try:
        if peer not in PEER_PYTHON:
            raise PeerUnavailable(f"{peer}: no such peer (known: {', '.join(PEER_PYTHON)})")
        python = PEER_PYTHON[peer]()
        if python is None:
            raise PeerUnavailable(f"{peer}: no python3 found")
        row["python"] = python
        row.update(run_peer(ensure_venv(), n, python))
    except PeerUnavailable as exc:
        row["error"] = str(exc)
    return row


def run_all(opts: Options, out: Path | None) -> list[dict[str, Any]]:
    """Every run of the table; the swarms' HOMEs (logs and state, on tmpfs by default:
    memory) are removed at the end, every swarm having been stopped by then."""
    base = Path(tempfile.mkdtemp(prefix="agentctl-bench-", dir=opts.scratch))
    try:
        return _run_all(opts, out, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _run_all(opts: Options, out: Path | None, base: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    sizes = sorted(set(opts.sizes + ([opts.big] if opts.big else [])))
    for rep in range(opts.rep_offset, opts.rep_offset + opts.reps):
        for n in sizes:
            targets = list(opts.modes) if n != opts.big else ["fork-server"]
            targets += [p for p in opts.peers if n != opts.big]
            for target in targets:
                if n == opts.big and rep > 0:
                    continue
                print(f"[{time.strftime('%H:%M:%S')}] rep {rep + 1} {target} N={n}",
                      file=sys.stderr, flush=True)
                row = bench_peer(target, n, rep) if target.startswith("supervisord") else \
                    bench_size(target, n, rep, opts, base)
                _log_row(row)
                rows.append(row)
                if out:
                    out.write_text(json.dumps(rows, indent=1))
    for scan in opts.ksm_scans if opts.ksm_seconds else ():
        print(f"[{time.strftime('%H:%M:%S')}] merge-pages, KSM at {scan} pages per 20 ms, N=100, "
              f"{opts.ksm_seconds:.0f} s", file=sys.stderr, flush=True)
        rows.append(bench_ksm(100, opts.ksm_seconds, scan, base))
        if out:
            out.write_text(json.dumps(rows, indent=1))
    return rows


def _log_row(row: dict[str, Any]) -> None:
    brief = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
             if k not in ("recovery_s", "notes")}
    print("   ", json.dumps(brief)[:600], file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the table
def med(rows: list[dict[str, Any]], mode: str, n: int, key: str) -> float | None:
    values: list[float] = []
    for r in rows:
        if r["mode"] == mode and r["n"] == n and key in r:
            v = r[key]
            values.extend(v if isinstance(v, list) else [v])
    return statistics.median(values) if values else None


def fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def table(rows: list[dict[str, Any]], opts: Options) -> str:
    if not opts.modes:
        return "\n".join(f"| {r['mode']} | N={r['n']} | ready {fmt(r.get('ready_s'))} s | "
                         f"USS/PSS {fmt(r.get('uss_mb'))}/{fmt(r.get('pss_mb'))} MB |" for r in rows)
    modes = opts.modes + opts.peers
    lines = ["## Ready time (s, median) and memory per idle daemon (MB, median)", "",
             "| N | " + " | ".join(f"{m} ready" for m in modes) + " | "
             + " | ".join(f"{m} USS / PSS" for m in opts.modes)
             + " | total PSS (" + opts.modes[0] + ") | ratios |",
             "|---" * (2 + len(modes) + len(opts.modes)) + "|---|"]
    for n in sorted(opts.sizes):
        ready = {m: med(rows, m, n, "ready_s") for m in modes}
        mem = [f"{fmt(med(rows, m, n, 'uss_mb'))} / {fmt(med(rows, m, n, 'pss_mb'))}" for m in opts.modes]
        lines.append(f"| {n} | " + " | ".join(fmt(ready[m]) for m in modes) + " | " + " | ".join(mem)
                     + f" | {fmt(med(rows, opts.modes[0], n, 'total_pss_mb'), 0)} | {_ratios(ready)} |")
    lines += ["", "## At N = 100 (median)", "", "| figure | " + " | ".join(opts.modes) + " | goal |",
              "|---|" + "---|" * len(opts.modes) + "---|"]
    for key, label, goal, scale in (
            ("cpu_supervisor_pct", f"supervisor CPU, % of a core over {opts.cpu_window:.0f} s (schedstat)", "< 0.2", 1),
            ("cpu_daemons_pct", "all daemons CPU, % of a core", "< 1", 1),
            ("cpu_supervisor_stat_pct", "  supervisor by /proc/PID/stat ticks", "", 1),
            ("cpu_daemons_stat_pct", "  all daemons by /proc/PID/stat ticks", "", 1),
            ("cpu_helpers_pct", "fork-server CPU, % of a core", "", 1),
            ("cpu_relay_pct", "relay CPU, % of a core", "", 1),
            ("boot_cpu_supervisor_s", "CPU s to boot 100: supervisor", "", 1),
            ("boot_cpu_daemons_s", "CPU s to boot 100: all daemons", "", 1),
            ("boot_cpu_helpers_s", "CPU s to boot 100: fork-server", "", 1),
            ("boot_cpu_relay_s", "CPU s to boot 100: relay", "", 1),
            ("boot_ms_total", "one daemon's boot under the load of 100, ms (gate to ready)", "", 1),
            ("boot_ms_spawn", "  of which: spawn (fork-server answer, or fork+exec)", "", 1),
            ("boot_ms_prepare", "  of which: workspace and identity", "", 1),
            ("boot_ms_confine", "  of which: sandbox", "", 1),
            ("boot_ms_connect", "  of which: connect, identify, join", "", 1),
            ("forkserver_fallbacks", "daemons exec'd because the fork-server failed", "0", 1),
            ("recovery_s", f"recovery beyond 1 s backoff, ms (median of {opts.kills})", "< 100", 1000),
            ("reload_s", "SIGHUP -> reloaded, ms (500 daemons)", "< 200", 1000),
            ("scale_up_s", "scale 100 -> 500, s", "< 4", 1),
            ("scale_down_s", "scale 500 -> 100, s", "< 4", 1)):
        vals = [med(rows, m, 100, key) for m in opts.modes]
        lines.append(f"| {label} | " + " | ".join(fmt(None if v is None else v * scale) for v in vals)
                     + f" | {goal} |")
    if opts.big:
        b = opts.big
        lines += ["", f"## {b} daemons (fork-server, one run)", "",
                  f"ready {fmt(med(rows, 'fork-server', b, 'ready_s'))} s, "
                  f"USS/PSS {fmt(med(rows, 'fork-server', b, 'uss_mb'))}/"
                  f"{fmt(med(rows, 'fork-server', b, 'pss_mb'))} MB, "
                  f"total PSS {fmt(med(rows, 'fork-server', b, 'total_pss_mb'), 0)} MB, "
                  f"idle CPU supervisor {fmt(med(rows, 'fork-server', b, 'cpu_supervisor_pct'), 3)} %, "
                  f"daemons {fmt(med(rows, 'fork-server', b, 'cpu_daemons_pct'), 3)} %, "
                  f"relay {fmt(med(rows, 'fork-server', b, 'cpu_relay_pct'), 3)} %"]
    ksm = [r for r in rows if r["mode"].startswith("ksm-") and r.get("samples")]
    if ksm:
        lines += ["", "## merge-pages: true, KSM on, 100 idle daemons (one run per scan rate)", "",
                  "| pages_to_scan (per 20 ms) | t (s) | USS / PSS per daemon (MB) | total PSS (MB) "
                  "| ksmd, % of a core | pages sharing |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['mode'][4:]} | {s['t_s']} | {s['uss_mb']:.2f} / {s['pss_mb']:.2f} "
                  f"| {s['total_pss_mb']:.0f} | {s['ksmd_pct']:.1f} | {s['pages_sharing']} |"
                  for r in ksm for s in r["samples"]]
    errors = [f"- {r['mode']} N={r['n']} rep {r['rep'] + 1}: {r['error'].splitlines()[0]}"
              for r in rows if "error" in r]
    errors += [f"- {r['mode']} N={r['n']} rep {r['rep'] + 1}: {e}"
               for r in rows for e in r.get("scenario_errors", [])]
    if errors:
        lines += ["", "## Failures", "", *errors]
    return "\n".join(lines)


def _ratios(ready: dict[str, float | None]) -> str:
    fs = ready.get("fork-server")
    parts = [f"{other}/fork-server {ready[other] / fs:.1f}x"
             for other in ("exec", "supervisord", "supervisord-python3") if fs and ready.get(other)]
    return ", ".join(parts) or "-"


def parse_args(argv: list[str] | None) -> tuple[Options, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="1 repetition, 20 s CPU window, 10 kills, no 1000 row")
    parser.add_argument("--sizes", default="10,100,500")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--spawn", default="fork-server,exec")
    parser.add_argument("--peers", default="supervisord,supervisord-python3",
                        help="comma list, or '' for none")
    parser.add_argument("--big", type=int, default=None, help="the N-daemons row (0 = skip)")
    parser.add_argument("--ready-timeout", type=float, default=0.0,
                        help="give up waiting for N heartbeats after this many s (default max(60, N/2))")
    parser.add_argument("--rep-offset", type=int, default=0,
                        help="number the repetitions from here (>0 skips the CPU/recovery scenarios, "
                             "which run on repetition 0 only): to add repetitions to an earlier run")
    parser.add_argument("--out", type=Path, help="also write every row as JSON here")
    parser.add_argument("--ksm", type=float, default=0.0, metavar="SECONDS",
                        help="also run 100 daemons with merge-pages: true and KSM on (root), "
                             "sampling USS/PSS and ksmd's CPU for SECONDS")
    parser.add_argument("--ksm-scan", default="100,2000",
                        help="KSM pages_to_scan values to try (per 20 ms; the kernel default is 100)")
    parser.add_argument("--scratch", default=default_scratch(),
                        help="where the swarms' HOMEs go (default: /dev/shm, a tmpfs, if present)")
    args = parser.parse_args(argv)
    return Options(sizes=[int(s) for s in args.sizes.split(",") if s],
                   reps=args.reps or (1 if args.quick else 3),
                   modes=[m for m in args.spawn.split(",") if m],
                   peers=[p for p in args.peers.split(",") if p],
                   big=args.big if args.big is not None else (0 if args.quick else 1000),
                   cpu_window=20.0 if args.quick else 60.0,
                   kills=10 if args.quick else 20, quick=args.quick,
                   ready_timeout=args.ready_timeout, rep_offset=args.rep_offset,
                   scratch=args.scratch, ksm_seconds=args.ksm,
                   ksm_scans=tuple(int(s) for s in args.ksm_scan.split(",") if s)), args.out


def default_scratch() -> str | None:
    """A tmpfs for the HOMEs: every repetition creates and deletes N workspaces, and ext4
    then skips the inodes deleted in the last minutes when it allocates new ones
    (``recently_deleted``), so on a disk each repetition would slow the next one's
    mkdirs (perf: up to a third of daemon CPU in ext4's inode search)."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def byte_compile_package(root: Path = ROOT) -> str:
    """Write the package's bytecode caches, as ``pip install`` and the Debian package do
    at install time, so that every start measures an installed swarm. Without them,
    each supervisor, fork-server and exec'd daemon compiles the modules it imports from
    source at every start (~0.1 s of the supervisor's start, measured), and
    PYTHONDONTWRITEBYTECODE=1, which some environments set (these machines do), keeps
    Python from writing them itself. ``root``: the project copy (this one by default).
    Returns a line for the report."""
    import compileall
    package = root / "agentctl_swarm"
    ok = compileall.compile_dir(str(package), quiet=1)
    return f"bytecode of {package} {'written' if ok else 'NOT fully written (see errors above)'}"


def main(argv: list[str] | None = None) -> int:
    # SIGTERM, and SIGINT even when started in the background (where it is ignored),
    # unwind through the finally blocks, so every swarm and relay is stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    opts, out = parse_args(argv)
    print(f"# swarm_bench: {' '.join(sys.argv)}  ({os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.2f}, {time.strftime('%Y-%m-%d %H:%M:%S')}, "
          f"HOMEs in {opts.scratch or tempfile.gettempdir()}; {byte_compile_package()})", flush=True)
    rows = run_all(opts, out)
    print(table(rows, opts))
    return 1 if any("error" in r or "scenario_errors" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
