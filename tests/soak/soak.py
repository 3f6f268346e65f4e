"""Fault-injection soak: a real swarm, a stream of tasks, faults on a seeded schedule.

    python tests/soak/soak.py --minutes 3 --seed 1 [--relay embedded|external] [--persist]

Design note
-----------
The swarm is real (``tests/swarmlib.Swarm``: its own HOME, the real CLI); the agent
is ``tests/fakes/fake_claude.py`` behind ``soak_agent.py``, a wrapper that reports
every session (task id, pids, exit status) to a datagram socket owned by the soak
(``Recorder``). Sessions stay sandboxed (``sandbox: auto``, Landlock here): Landlock
up to ABI 7 does not cover connecting to a pathname Unix socket, so the reports get
out without weakening the confinement, and a pidfd per reported pid gives the exact
end of even a SIGKILLed session. That is how "never run twice at the same time" is
proven from the outside rather than from what the swarm says about itself.

Four threads: the main one injects faults (strictly one at a time, so each finding
has one cause), a poster adds tasks (control socket, as the CLI does, but without a
fresh interpreter per task), a sampler compares ``status`` with /proc and with the
relay as seen by an observer client every ``SAMPLE_S``, and the recorder. A mismatch
counts only if it is still there ``CONFIRM_S`` later (the sampler and the swarm race
by nature; a lie persists). Timing tolerances are derived from the configured
heartbeat interval and misses, never tuned to make a run pass.

The disk-full fault needs a tmpfs mounted over ``$HOME/.agentctl`` before the
swarm starts, hence root; without it the fault is skipped with the reason printed.
Exit status: 0 when every check passed, 1 otherwise, 2 when the soak itself broke.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agentctl_swarm.control import client as control  # noqa: E402
from agentctl_swarm.errors import SwarmError  # noqa: E402
from agentctl_swarm.restart_policy import GiveUp, RestartTracker  # noqa: E402
from tests import swarmlib  # noqa: E402
from tests.soak import peers  # noqa: E402

WRAPPER = ROOT / "tests" / "soak" / "soak_agent.py"
HB_INTERVAL = 2.0
HB_MISSES = 3
MAX_TASK_S = 12.0
SAMPLE_S = 0.5
CONFIRM_S = 1.5
STUCK_CONFIRM_S = 15.0
TMPFS_SIZE = "256m"
SUCCESS_MODES = ("success", "slow", "text", "tokens", "orphan")


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- recorder


@dataclass
class Run:
    """One agent session as reported by the wrapper and watched through pidfds."""

    task: str
    pid: int
    start: float
    child: int | None = None
    rc: int | None = None
    exits: dict[int, float] = field(default_factory=dict)

    @property
    def end(self) -> float | None:
        pids = [self.pid] + ([self.child] if self.child else [])
        if all(p in self.exits for p in pids):
            return max(self.exits[p] for p in pids)
        return None


class Recorder(threading.Thread):
    """Receives the wrapper's reports; a pidfd per pid tells when each process is gone."""

    def __init__(self, path: Path) -> None:
        super().__init__(name="soak-recorder", daemon=True)
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        os.chmod(path, 0o666)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.sock, selectors.EVENT_READ, None)
        self.runs: dict[int, Run] = {}
        self.lock = threading.Lock()
        self.stopping = False

    def run(self) -> None:
        while not self.stopping:
            for key, _ in self.sel.select(0.2):
                if key.data is None:
                    self._receive()
                else:
                    self._exited(*key.data, key.fileobj)

    def _receive(self) -> None:
        try:
            msg = json.loads(self.sock.recv(65536))
        except (OSError, ValueError):
            return
        now = time.time()
        with self.lock:
            if msg.get("ev") == "start":
                run = Run(str(msg.get("task", "")), int(msg["pid"]), float(msg.get("t", now)))
                self.runs[run.pid] = run
                self._watch(run, run.pid)
            elif msg.get("ev") == "child" and int(msg["pid"]) in self.runs:
                run = self.runs[int(msg["pid"])]
                run.child = int(msg["child"])
                self._watch(run, run.child)
            elif msg.get("ev") == "end" and int(msg["pid"]) in self.runs:
                self.runs[int(msg["pid"])].rc = int(msg["rc"])

    def _watch(self, run: Run, pid: int) -> None:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            run.exits[pid] = time.time()
            return
        self.sel.register(fd, selectors.EVENT_READ, (run, pid))

    def _exited(self, run: Run, pid: int, fd: Any) -> None:
        with self.lock:
            run.exits[pid] = time.time()
        self.sel.unregister(fd)
        os.close(fd)

    def snapshot(self) -> list[Run]:
        with self.lock:
            return list(self.runs.values())

    def live_for(self, task: str) -> list[Run]:
        return [r for r in self.snapshot() if r.task == task and r.end is None]

    def close(self) -> None:
        self.stopping = True
        self.join(2)
        self.sock.close()


# --------------------------------------------------------------------------- /proc


def proc_stat(pid: int) -> tuple[int, str] | None:
    """(ppid, state) of ``pid`` or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields_ = text[text.rfind(")") + 2:].split()
    return int(fields_[1]), fields_[0]


def alive(pid: int | None) -> bool:
    st = proc_stat(pid) if pid else None
    return st is not None and st[1] not in ("Z", "X")


def children_of(ppid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = proc_stat(int(entry))
            if st is not None and st[0] == ppid and st[1] not in ("Z", "X"):
                out.append(int(entry))
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def sup_metrics(pid: int) -> tuple[int, int] | None:
    """(VmRSS kB, open fds) of the supervisor."""
    try:
        rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                   if line.startswith("VmRSS:"))
        return rss, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration):
        return None


# --------------------------------------------------------------------------- the run


@dataclass
class Posted:
    id: str
    mode: str
    via: str
    at: float
    certain: bool = True  # False: the post timed out, it may or may not exist


@dataclass
class Expectation:
    what: str
    deadline: float
    check: Callable[[dict[str, Any]], bool]
    met_at: float | None = None


@dataclass
class Check:
    name: str
    ok: bool | None  # None: skipped or informational
    detail: str


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.task_rng = random.Random(args.seed * 7919 + 1)
        self.home = Path(tempfile.mkdtemp(prefix=f"agentctl-soak-s{args.seed}-", dir=args.tmp))
        self.paths = self.home / ".agentctl"
        self.sock_path = self.paths / "run" / "control.sock"
        self.recorder = Recorder(self.home / "soak-recorder.sock")
        self.peers = peers.PeerLoop()
        self.observer = peers.Observer(self.peers)
        self.poster = peers.Poster(self.peers)
        self.observer.ignore.add(self.poster.identity.agent_id)
        self.swarm: swarmlib.Swarm | None = None
        self.relay_proc: subprocess.Popen[bytes] | None = None
        self.relay_port = 0
        self.tmpfs = False
        self.tmpfs_reason = ""
        self.posted: dict[str, Posted] = {}
        self.refused_posts = 0
        self.faults: list[tuple[float, str, str]] = []  # (time, fault, detail)
        self.expectations: list[Expectation] = []
        self.violations: dict[str, list[str]] = {}
        self.pending: dict[tuple[str, ...], float] = {}
        self.samples: list[dict[str, Any]] = []
        self.metrics: dict[int, list[tuple[float, int, int, int]]] = {}  # sup pid -> (t, rss, fds, n)
        self.agent_names: set[str] = set()
        self.desired_expected = args.count
        self.max_active = 3
        self.sup_pids: list[int] = []
        self.fs_tracker = RestartTracker()  # what the supervisor's policy says of the fork-server
        self.down = threading.Event()  # set while the supervisor is deliberately down
        self.stop_posting = threading.Event()
        self.stop_sampling = threading.Event()
        self.lock = threading.Lock()
        self.task_no = 0
        self.orphans_after_crash: list[str] = []
        self.hup_notes: list[str] = []
        self.stop_checks: list[str] = []
        self.sigstop_notes: list[str] = []
        self.disk_notes: list[str] = []
        self.flood_stats: dict[str, int] = {}
        self.skipped: list[str] = []
        self.config: dict[str, Any] = {}

    # ------------------------------------------------------------------ setup
    def violation(self, check: str, text: str) -> None:
        with self.lock:
            items = self.violations.setdefault(check, [])
            if len(items) < 50:
                items.append(f"{time.strftime('%H:%M:%S')} {text}")
        log(f"VIOLATION [{check}] {text}")

    def make_config(self) -> dict[str, Any]:
        server = "embedded" if self.args.relay == "embedded" else f"ws://127.0.0.1:{self.relay_port}"
        return {
            "count": self.args.count,
            "max-active": self.max_active,
            "token-budget": 10 ** 15,
            "heartbeat-interval": f"{HB_INTERVAL:g}s",
            "heartbeat-misses": HB_MISSES,
            "max-task-duration": f"{MAX_TASK_S:g}s",
            "status-interval": "1s",
            "shutdown-grace": "3s",
            "health-sample-interval": "5s",
            "workspace-base": str(self.home / "ws"),
            "persist": bool(self.args.persist),
            "agentchat": {"server": server, "rate-limit": 50},
            "agent": {"command": [sys.executable, str(WRAPPER), str(swarmlib.FAKE_CLAUDE), "-p",
                                  "--output-format", "stream-json", "--verbose"],
                      "env": {"SOAK_RECORDER": str(self.recorder.path)},
                      "memory-limit": "512M"},
        }

    def mount_tmpfs(self) -> None:
        if os.geteuid() != 0:
            self.tmpfs_reason = "not root: cannot mount a tmpfs for the disk-full fault"
            return
        self.paths.mkdir(mode=0o700, parents=True, exist_ok=True)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700",
                                 "soak-agentctl", str(self.paths)], capture_output=True, text=True)
        if result.returncode != 0:
            self.tmpfs_reason = f"mount not permitted: {result.stderr.strip()}"
            return
        self.tmpfs = True

    def start_external_relay(self) -> None:
        if not self.relay_port:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                self.relay_port = probe.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k != "HOME"}
        out = open(self.home / "relay.stderr", "ab")
        self.relay_proc = subprocess.Popen(
            [sys.executable, "-m", "agentctl_swarm.agentchat.relay", "--port", str(self.relay_port),
             "--rate-limit", "50"], stdout=out, stderr=subprocess.STDOUT, env=env, cwd="/",
            start_new_session=True)
        out.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.relay_port), 0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("external relay did not start")

    def stop_external_relay(self) -> None:
        if self.relay_proc is not None and self.relay_proc.poll() is None:
            self.relay_proc.terminate()
            try:
                self.relay_proc.wait(10)
            except subprocess.TimeoutExpired:
                self.relay_proc.kill()
                self.relay_proc.wait(5)

    # ------------------------------------------------------------------ control
    def call(self, cmd: str, args: dict[str, Any] | None = None, timeout: float = 5.0) -> dict[str, Any]:
        return control.call(self.sock_path, cmd, args, timeout=timeout)

    def status(self) -> dict[str, Any] | None:
        try:
            reply = self.call("status")
        except (SwarmError, OSError, ValueError):
            return None
        return reply if reply.get("ok") else None

    def start_swarm(self, first: bool = False) -> None:
        assert self.swarm is not None
        self.swarm.start(wait_ready=False) if first else self._restart_process()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            snap = self.status()
            if snap and snap["supervisor"]["ready"]:
                self.sup_pids.append(snap["supervisor"]["pid"])
                # a new supervisor keeps no fork-server history: the policy starts afresh
                self.fs_tracker = RestartTracker()
                self.fs_tracker.on_start(time.monotonic())
                self.observer.set_url(snap["supervisor"]["agentchat_server"])
                self.poster.set_url(snap["supervisor"]["agentchat_server"])
                return
            self.swarm.check_alive()
            time.sleep(0.1)
        raise SwarmError("the supervisor did not become ready in 60 s" + self.swarm.tail())

    def _restart_process(self) -> None:
        """A fresh ``agentctl swarm start`` as systemd's Restart= would do (same config file)."""
        assert self.swarm is not None
        log_file = open(self.swarm.log_path, "ab")
        self.swarm.proc = subprocess.Popen([*swarmlib.AGENTCTL, "swarm", "start"], env=self.swarm.env(),
                                           stdout=log_file, stderr=subprocess.STDOUT, cwd=self.home,
                                           start_new_session=True)
        log_file.close()

    def hup(self) -> None:
        """SIGHUP the supervisor (faults run one at a time, so it is up)."""
        pid = self.sup_pid()
        if pid is None or not send_signal(pid, signal.SIGHUP):
            raise RuntimeError("the supervisor is not running to be sent SIGHUP")

    def sup_pid(self) -> int | None:
        return self.swarm.proc.pid if self.swarm and self.swarm.proc and self.swarm.proc.poll() is None else None

    def wait_status(self, predicate: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            snap = self.status()
            if snap is not None and predicate(snap):
                return snap
            time.sleep(0.2)
        return None

    # ------------------------------------------------------------------ posting
    def new_prompt(self) -> tuple[str, str]:
        r = self.task_rng.random()
        if r < 0.25:
            mode = "success"
        elif r < 0.62:
            mode = f"slow:{self.task_rng.uniform(0.3, 6):.1f}"
        elif r < 0.72:
            mode = "fail"
        elif r < 0.77:
            mode = "crash"
        elif r < 0.81:
            mode = "api-error"
        elif r < 0.84:
            mode = "hang"
        elif r < 0.87:
            mode = "deny"
        elif r < 0.91:
            mode = "orphan"
        elif r < 0.96:
            mode = "text"
        else:
            mode = f"tokens:{self.task_rng.randint(10, 5000)}"
        return mode, mode

    def post_one(self) -> None:
        self.task_no += 1
        via = "channel" if self.task_rng.random() < 0.08 else "cli"
        task_id = f"soak-{'ch' if via == 'channel' else 't'}{self.task_no:04d}"
        mode, _ = self.new_prompt()
        prompt = f"soak task [soak:{task_id}] [fake:{mode}]"
        if via == "channel":
            if self.poster.post(task_id, prompt):
                self.posted[task_id] = Posted(task_id, mode, via, time.time())
            else:
                self.refused_posts += 1
            return
        try:
            reply = self.call("task-add", {"prompt": prompt, "id": task_id, "role": "any"}, timeout=5)
        except control.NotRunning:
            self.refused_posts += 1
            return
        except (SwarmError, OSError, ValueError):
            self.posted[task_id] = Posted(task_id, mode, via, time.time(), certain=False)
            return
        if reply.get("ok"):
            self.posted[task_id] = Posted(task_id, mode, via, time.time())
        else:
            self.refused_posts += 1
            log(f"task-add refused: {reply.get('error')}")

    def poster_loop(self) -> None:
        while not self.stop_posting.is_set():
            try:
                self.post_one()
            except Exception as exc:  # noqa: BLE001 - the poster must keep going; counted
                self.violation("soak-internal", f"poster: {exc!r}")
            self.stop_posting.wait(self.task_rng.uniform(0.4, 2.0))

    # ------------------------------------------------------------------ sampling
    def sampler_loop(self) -> None:
        while not self.stop_sampling.is_set():
            try:
                self.sample()
            except Exception as exc:  # noqa: BLE001
                self.violation("soak-internal", f"sampler: {exc!r}")
            self.stop_sampling.wait(SAMPLE_S)

    def confirm(self, key: tuple[str, ...], bad: bool, check: str, text: str) -> None:
        """Record ``text`` under ``check`` only if ``bad`` still holds CONFIRM_S later."""
        now = time.monotonic()
        if not bad:
            self.pending.pop(key, None)
            return
        first = self.pending.setdefault(key, now)
        if now - first >= CONFIRM_S and first != -1:
            self.violation(check, text)
            self.pending[key] = float("inf")  # report once per episode

    def sample(self) -> None:
        if self.down.is_set():
            self.pending.clear()
            return
        sup = self.sup_pid()
        snap = self.status()
        if snap is None or sup is None:
            return
        now = time.time()
        agents = snap["agents"]
        self.agent_names.update(a["name"] for a in agents)
        met = sup_metrics(sup)
        live = [a for a in agents if a["pid"]]
        if met:
            self.metrics.setdefault(sup, []).append((now, met[0], met[1], len(live)))
        self.samples.append({"t": now, "desired": snap["supervisor"]["desired"], "n": len(agents),
                             "states": {a["name"]: (a["status"], a["pid"], a.get("task")) for a in agents}})
        self.confirm(("suppid",), snap["supervisor"]["pid"] != sup, "status-vs-proc",
                     f"status says supervisor pid {snap['supervisor']['pid']}, process table {sup}")
        self.check_agents_vs_proc(sup, snap, agents)
        self.check_relay_view(agents, now)
        for exp in self.expectations:
            if exp.met_at is None and exp.check(snap):
                exp.met_at = now

    def check_agents_vs_proc(self, sup: int, snap: dict[str, Any], agents: list[dict[str, Any]]) -> None:
        listed = {a["pid"] for a in agents if a["pid"]}
        for a in agents:
            pid = a["pid"]
            if pid is None:
                continue
            st = proc_stat(pid)
            bad = st is None or st[1] in ("Z", "X") or st[0] != sup
            self.confirm(("agentpid", a["name"], str(pid)), bad, "status-vs-proc",
                         f"{a['name']} reported with pid {pid} ({a['status']}) but /proc says "
                         f"{'gone' if st is None else f'ppid {st[0]} state {st[1]}'}")
        helpers = {snap["supervisor"].get("relay_pid"), snap["supervisor"].get("forkserver_pid")}
        for child in children_of(sup):
            if child in listed or child in helpers:
                continue
            self.confirm(("stray", str(child)), True, "status-vs-proc",
                         f"child {child} of the supervisor is not in status: {cmdline(child)[:120]}")
        for key in [k for k in self.pending if k[0] == "stray" and int(k[1]) not in children_of(sup)]:
            self.pending.pop(key, None)

    def check_relay_view(self, agents: list[dict[str, Any]], now: float) -> None:
        since = self.observer.connected_since
        if not self.observer.connected or since is None or now - since < 2 * HB_INTERVAL + 1:
            return
        names = {a["name"] for a in agents}
        for a in agents:
            age = a.get("last_heartbeat_age_s")
            if not a.get("connected") or a["status"] == "stopping" or age is None or age > HB_INTERVAL:
                self.pending.pop(("relay-missing", a["name"]), None)
                continue
            seen = self.observer.last_hb.get(a["name"], 0.0)
            # A link problem must show in status within the heartbeat deadline (interval x misses).
            bad = now - seen > age + HB_INTERVAL * HB_MISSES + 1.0
            self.confirm(("relay-missing", a["name"]), bad, "status-vs-relay",
                         f"{a['name']} is connected per status (heartbeat {age}s ago) but the relay "
                         f"delivered no HEARTBEAT from it for {now - seen:.1f}s")
        for name, seen in self.observer.last_hb.items():
            bad = name not in names and now - seen < HB_INTERVAL * 0.75
            self.confirm(("relay-ghost", name), bad, "status-vs-relay",
                         f"{name} heartbeats on the relay but is not in status")

    # ------------------------------------------------------------------ faults
    def note(self, fault: str, detail: str) -> None:
        self.faults.append((time.time(), fault, detail))
        log(f"fault {fault}: {detail}")

    def expect(self, what: str, within: float, check: Callable[[dict[str, Any]], bool]) -> None:
        self.expectations.append(Expectation(what, time.time() + within, check))

    def extend_pending(self, began: float) -> None:
        """Nothing can recover while the swarm is down (or unobservable): a recovery
        pending across such a spell gets its length added to its deadline."""
        for exp in self.expectations:
            if exp.met_at is None and exp.deadline > began:
                exp.deadline += time.time() - began

    def agents(self) -> list[dict[str, Any]]:
        snap = self.status()
        return snap["agents"] if snap else []

    def pick_agent(self, statuses: tuple[str, ...] = ("idle", "active")) -> dict[str, Any] | None:
        candidates = [a for a in self.agents() if a["pid"] and a["status"] in statuses and a["restarts"] < 3]
        return self.rng.choice(candidates) if candidates else None

    def replaced(self, name: str, old_pid: int) -> Callable[[dict[str, Any]], bool]:
        def check(snap: dict[str, Any]) -> bool:
            a = next((x for x in snap["agents"] if x["name"] == name), None)
            return a is None or (a["pid"] not in (None, old_pid) and a["connected"])
        return check

    def fault_kill_daemon(self) -> None:
        a = self.pick_agent()
        if a is None:
            return self.note("kill-daemon", "no candidate")
        if not send_signal(a["pid"], signal.SIGKILL):
            return self.note("kill-daemon", f"no candidate ({a['name']} pid {a['pid']} exited first)")
        self.note("kill-daemon", f"{a['name']} pid {a['pid']} ({a['status']}, task {a.get('task')})")
        delay = min(2 ** a["restarts"], 300)
        self.expect(f"{a['name']} replaced after kill -9", delay + 10, self.replaced(a["name"], a["pid"]))

    def fault_kill_session(self) -> None:
        for _ in range(20):
            active = [a for a in self.agents() if a["status"] == "active" and a["pid"]]
            sessions = [(a, c) for a in active for c in children_of(a["pid"]) if "soak_agent.py" in cmdline(c)]
            if sessions:
                a, pid = self.rng.choice(sessions)
                if not send_signal(pid, signal.SIGKILL):
                    continue  # it ended by itself meanwhile
                return self.note("kill-session", f"session {pid} of {a['name']} (task {a.get('task')})")
            time.sleep(0.25)
        self.note("kill-session", "no active session found in 5 s")

    def fault_kill_forkserver(self) -> None:
        snap = self.status()
        pid = snap["supervisor"].get("forkserver_pid") if snap else None
        if not pid:
            return self.note("kill-forkserver", "no fork-server running")
        if not send_signal(pid, signal.SIGKILL):
            return self.note("kill-forkserver", f"no candidate (pid {pid} exited first)")
        # The issue: the fork-server restarts "with the same backoff rules" as a daemon, so
        # the deadline is that policy's delay (1, 2, 4 ... s) and, past its limit, the
        # supervisor rightly gives up and execs daemons: then nothing is expected here.
        now = time.monotonic()
        decision = self.fs_tracker.on_exit(now)
        if isinstance(decision, GiveUp):
            return self.note("kill-forkserver", f"pid {pid}; policy gives up ({decision.reason}): "
                             "daemons are exec'd from now on")
        self.note("kill-forkserver", f"pid {pid}; restart expected after {decision.delay:g}s")
        self.fs_tracker.on_start(now + decision.delay)
        self.expect("fork-server restarted", decision.delay + 20,
                    lambda s: s["supervisor"].get("forkserver_pid") not in (None, pid))

    def fault_kill_supervisor(self) -> None:
        sup = self.sup_pid()
        assert sup is not None and self.swarm is not None and self.swarm.proc is not None
        snap = self.status() or {"agents": []}
        self.down.set()
        began = time.time()
        os.kill(sup, signal.SIGKILL)
        self.swarm.proc.wait(10)
        self.note("kill-supervisor", f"pid {sup} with {len(snap['agents'])} agents")
        time.sleep(3.0)  # PDEATHSIG is immediate; 3 s is generous for the kernel to deliver it
        left = [p for p in swarmlib.swarm_processes(self.home)
                if not (self.relay_proc and p == self.relay_proc.pid)]
        self.start_swarm()
        self.down.clear()
        # e.g. a fork-server restart pending when the supervisor died comes with the next one
        self.extend_pending(began)
        time.sleep(2.0)
        survivors = [p for p in left if alive(p) and sup not in _ancestors(p)
                     and self.sup_pid() not in _ancestors(p) and p != self.sup_pid()]
        for pid in survivors:
            self.orphans_after_crash.append(f"pid {pid} alive 5 s after kill -9 of supervisor {sup}, "
                                            f"still after the restart: {cmdline(pid)[:150]}")
            self.violation("no-orphans-after-crash", self.orphans_after_crash[-1])
        desired = self.desired_expected
        self.expect(f"desired {desired} kept across supervisor restart", 5,
                    lambda s: s["supervisor"]["desired"] == desired)

    def fault_sigstop_daemon(self) -> None:
        a = self.pick_agent()
        if a is None:
            return self.note("sigstop-daemon", "no candidate")
        length = (HB_MISSES + 1.5) * HB_INTERVAL + self.rng.uniform(0, HB_INTERVAL)
        t_stop = time.time()
        if not send_signal(a["pid"], signal.SIGSTOP):
            return self.note("sigstop-daemon", f"no candidate ({a['name']} pid {a['pid']} exited first)")
        self.note("sigstop-daemon", f"{a['name']} pid {a['pid']} for {length:.1f}s")
        time.sleep(length)
        send_signal(a["pid"], signal.SIGCONT)
        self.sigstop_notes.append(json.dumps({"name": a["name"], "pid": a["pid"], "t_stop": t_stop,
                                              "t_cont": time.time(), "restarts": a["restarts"]}))
        delay = min(2 ** a["restarts"], 300)
        self.expect(f"{a['name']} replaced after missing heartbeats", delay + 10,
                    self.replaced(a["name"], a["pid"]))

    def fault_relay_outage(self) -> None:
        top = 60.0 if self.args.minutes >= 10 else 25.0
        length = self.rng.uniform(20.0, top)
        began = time.time()
        try:
            self._relay_outage(length)
        finally:
            # Recoveries are seen at the relay: one pending across the outage gets its length.
            self.extend_pending(began)
        self.expect("every agent reconnected after the relay outage", 45,
                    lambda s: all(a["connected"] for a in s["agents"] if a["pid"] and a["status"] != "stopping"))

    def _relay_outage(self, length: float) -> None:
        if self.args.relay == "external":
            self.stop_external_relay()
            self.note("relay-outage", f"external relay stopped for {length:.0f}s")
            time.sleep(length)
            self.start_external_relay()
        else:
            snap = self.status()
            pid = snap["supervisor"].get("relay_pid") if snap else None
            if not pid:
                return self.note("relay-outage", "no embedded relay pid")
            if self.rng.random() < 0.5:
                if not send_signal(pid, signal.SIGSTOP):
                    return self.note("relay-outage", f"no candidate (relay {pid} exited first)")
                self.note("relay-outage", f"embedded relay {pid} SIGSTOPped for {length:.0f}s")
                time.sleep(length)
                send_signal(pid, signal.SIGCONT)
            else:
                if not send_signal(pid, signal.SIGKILL):
                    return self.note("relay-outage", f"no candidate (relay {pid} exited first)")
                self.note("relay-outage", f"embedded relay {pid} killed; the supervisor restarts it")
                time.sleep(length)

    def fault_hup(self, kind: str) -> None:
        assert self.swarm is not None
        path = self.swarm.config_path
        good = dict(self.config)
        before = self.status()
        if kind == "valid":
            self.max_active = 2 if self.max_active == 3 else 3
            good["max-active"] = self.max_active
            good["token-budget"] = 10 ** 15 + self.rng.randint(1, 10 ** 6)
            self.config = good
            _write_atomic(path, good)
            self.hup()
            want = self.max_active
            self.note("sighup-valid", f"max-active -> {want}")
            self.expect(f"reload applied max-active {want}", 5, lambda s: s["supervisor"]["max_active"] == want)
        else:
            hidden = path.with_name("swarm.yaml.soak-hidden")
            if kind == "broken":
                path.write_text("max-active: [this is not a number\n  heartbeat-interval: -3\n")
            else:
                os.rename(path, hidden)
            self.hup()
            self.note(f"sighup-{kind}", "invalid YAML" if kind == "broken"
                      else "config file removed while the supervisor reads it")
            time.sleep(1.0)
            after = self.status()
            keep = before["supervisor"]["max_active"] if before else None
            if after is not None and keep is not None and after["supervisor"]["max_active"] != keep:
                self.violation("reload-keeps-old-config",
                               f"sighup-{kind}: max-active changed {keep} -> {after['supervisor']['max_active']}")
            self.hup_notes.append(kind)
            if kind == "broken":
                _write_atomic(path, good)
            else:
                os.rename(hidden, path)
                time.sleep(0.3)
                self.hup()  # back to the intended config, as an operator would

    def fault_scale(self, direction: str) -> None:
        assert self.swarm is not None
        for _ in range(20):  # while agents are active, as the issue asks
            if any(a["status"] == "active" for a in self.agents()):
                break
            time.sleep(0.25)
        cur = self.desired_expected
        new = min(cur + self.rng.randint(1, 2), 7) if direction == "up" else max(cur - self.rng.randint(1, 2), 2)
        if new == cur:
            new = cur + 1 if direction == "up" else cur - 1
        active = sorted(a["name"] for a in self.agents() if a["status"] == "active")
        result = self.swarm.cli("swarm", "scale", str(new), check=False)
        self.note(f"scale-{direction}", f"{cur} -> {new} (active: {', '.join(active) or 'none'}): "
                                        f"{(result.stdout or result.stderr).strip()[:120]}")
        if result.returncode != 0:
            self.violation("scale", f"scale {new} failed: {result.stderr.strip()}")
            return
        self.desired_expected = new
        self.expect(f"scaled to {new}", MAX_TASK_S + 15,
                    lambda s: s["supervisor"]["desired"] == new and
                    len([a for a in s["agents"] if a["status"] != "stopping"]) == new)

    def fault_disk_full(self) -> None:
        if not self.tmpfs:
            self.skipped.append(f"disk-full: {self.tmpfs_reason}")
            return self.note("disk-full", f"SKIPPED: {self.tmpfs_reason}")
        filler = self.paths / "soak-filler"
        written = 0
        try:
            with open(filler, "wb") as fh:
                chunk = b"\0" * (1 << 20)
                while True:
                    fh.write(chunk)
                    fh.flush()
                    written += len(chunk)
        except OSError:
            pass
        length = self.rng.uniform(8, 15)
        self.note("disk-full", f"{self.paths} filled ({written >> 20} MiB) for {length:.0f}s")
        time.sleep(length)
        filler.unlink()
        t_free = time.time()
        self.disk_notes.append(str(t_free))

    def fault_flood(self) -> None:
        snap = self.status()
        if snap is None:
            return
        length = self.rng.uniform(6, 12)
        names = [a["name"] for a in snap["agents"]]
        tasks = list(self.posted)[-20:]
        self.note("flood", f"misbehaving peers for {length:.0f}s")
        stats = self.peers.run(peers.flood(snap["supervisor"]["agentchat_server"], length,
                                           random.Random(self.rng.random()), names, tasks,
                                           self.observer.ignore), timeout=length + 30)
        for k, v in stats.items():
            self.flood_stats[k] = self.flood_stats.get(k, 0) + v

    FAULTS: dict[str, Callable[["Soak"], None]] = {
        "kill-daemon": fault_kill_daemon,
        "kill-session": fault_kill_session,
        "kill-forkserver": fault_kill_forkserver,
        "kill-supervisor": fault_kill_supervisor,
        "sigstop-daemon": fault_sigstop_daemon,
        "relay-outage": fault_relay_outage,
        "sighup-valid": lambda self: self.fault_hup("valid"),
        "sighup-broken": lambda self: self.fault_hup("broken"),
        "sighup-deleted": lambda self: self.fault_hup("deleted"),
        "scale-up": lambda self: self.fault_scale("up"),
        "scale-down": lambda self: self.fault_scale("down"),
        "disk-full": fault_disk_full,
        "flood": fault_flood,
    }
    REQUIRED = ["kill-daemon", "kill-daemon", "kill-session", "kill-session", "kill-forkserver",
                "kill-supervisor", "kill-supervisor", "sigstop-daemon", "relay-outage", "sighup-valid",
                "sighup-broken", "sighup-deleted", "scale-up", "scale-down", "disk-full", "flood"]

    def schedule(self) -> list[str]:
        """The required faults in a seeded order; supervisor kills spread out, none last."""
        order = list(self.REQUIRED)
        self.rng.shuffle(order)
        sup = [f for f in order if f == "kill-supervisor"]
        rest = [f for f in order if f != "kill-supervisor"]
        third = max(1, len(rest) // 3)
        rest.insert(third * 2, sup[1])
        rest.insert(third // 2 + 1, sup[0])
        return rest

    def fault_loop(self, deadline: float) -> None:
        plan = self.schedule()
        retries = {name: 3 for name in plan}
        pool = [f for f in self.FAULTS if f != "kill-supervisor"] + ["kill-supervisor"]
        while plan or time.time() < deadline:
            name = plan.pop(0) if plan else self.rng.choice(pool)
            if not plan and time.time() > deadline - 30 and name in ("kill-supervisor", "relay-outage"):
                continue  # keep the end of a long run calm enough to measure the final state
            self.swarm.check_alive()  # type: ignore[union-attr]
            before = len(self.faults)
            self.FAULTS[name](self)
            last = self.faults[-1][2] if len(self.faults) > before else ""
            if ("no candidate" in last or "no active session" in last) and retries.get(name, 0) > 0:
                retries[name] -= 1
                plan.insert(min(2, len(plan)), name)  # a required fault must happen: try again soon
            self.stop_posting.wait(self.rng.uniform(1.0, 4.0))

    # ------------------------------------------------------------------ the run
    def run(self) -> int:
        try:
            return self._run()
        finally:
            self.cleanup()

    def _run(self) -> int:
        log(f"home {self.home}, seed {self.args.seed}, {self.args.minutes} min, relay {self.args.relay}, "
            f"persist {self.args.persist}")
        self.mount_tmpfs()
        if not self.tmpfs:
            log(f"disk-full fault will be skipped: {self.tmpfs_reason}")
        self.recorder.start()
        if self.args.relay == "external":
            self.start_external_relay()
        self.config = self.make_config()
        self.swarm = swarmlib.Swarm(self.home, self.config)
        self.start_swarm(first=True)
        threads = [threading.Thread(target=self.sampler_loop, name="soak-sampler", daemon=True),
                   threading.Thread(target=self.poster_loop, name="soak-poster", daemon=True)]
        for t in threads:
            t.start()
        t0 = time.time()
        self.fault_loop(t0 + self.args.minutes * 60)
        self.stop_posting.set()
        log(f"faults done after {time.time() - t0:.0f}s; draining")
        self.drain()
        self.final = self.final_state()
        self.stop_sampling.set()
        for t in threads:
            t.join(10)
        self.final_stop()
        checks = self.checks()
        print_table(checks)
        self.report_context(checks)
        return 0 if all(c.ok is not False for c in checks) else 1

    def drain(self) -> None:
        """Wait until no posted task is open and every agent is idle (bounded)."""
        deadline = time.time() + 90
        while time.time() < deadline:
            snap = self.status()
            tasks = self.task_list()
            if snap and tasks is not None:
                open_ = [t for t in tasks.values() if t["state"] in ("announced", "assigned", "running")]
                busy = [a for a in snap["agents"] if a["status"] not in ("idle", "degraded")]
                if not open_ and not busy:
                    return
            time.sleep(0.5)
        log("drain timed out; open tasks remain")

    def task_list(self) -> dict[str, dict[str, Any]] | None:
        try:
            reply = self.call("task-list", {"all": True})  # archived (older finished) tasks count too
        except (SwarmError, OSError, ValueError):
            return None
        return {t["id"]: t for t in reply.get("tasks", [])}

    def final_state(self) -> dict[str, Any]:
        assert self.swarm is not None
        # With a backlog the drain never empties the queue, so the swarm is still busy
        # here: an open task is stuck only if it is open in a snapshot STUCK_CONFIRM_S
        # earlier too, unchanged (more than the coordinator's 10 s expiry of an announced
        # or assigned task). The snapshots compared with each other are taken together.
        tasks_earlier = self.swarm.tasks(include_archived=True)
        time.sleep(STUCK_CONFIRM_S)
        tasks = self.swarm.tasks(include_archived=True)  # the real CLI; nothing may be lost
        live_only = self.swarm.tasks()
        status = self.swarm.status()
        disk = {}
        tasks_file = self.paths / "state" / "tasks.json"
        try:
            disk = {t["id"]: t for t in json.loads(tasks_file.read_text())["tasks"]}
        except (OSError, ValueError, KeyError) as exc:
            log(f"tasks.json unreadable: {exc}")
        budget_file = self.paths / "state" / "budget.json"
        try:
            budget_disk = json.loads(budget_file.read_text())
        except (OSError, ValueError):
            budget_disk = {}
        return {"tasks": tasks, "tasks_live": live_only, "tasks_earlier": tasks_earlier,
                "status": status, "tasks_disk": disk,
                "budget_disk": budget_disk,
                "live_sessions": {t: self.recorder.live_for(t) for t in tasks}}

    def final_stop(self) -> None:
        assert self.swarm is not None and self.swarm.proc is not None
        sup = self.swarm.proc.pid
        cg_name = _cgroup_name(self.paths)
        result = self.swarm.cli("swarm", "stop", check=False)
        try:
            code = self.swarm.proc.wait(40)
        except subprocess.TimeoutExpired:
            self.stop_checks.append(f"supervisor {sup} did not exit within 40 s of `swarm stop`")
            self.swarm.kill()
            code = None
        self.stop_result = (result.returncode, code)
        time.sleep(1.0)
        self.leftover_procs = [f"{p}: {cmdline(p)[:150]}" for p in swarmlib.swarm_processes(self.home)
                               if not (self.relay_proc and p == self.relay_proc.pid)]
        self.leftover_cgroups = _find_cgroups(cg_name)
        self.leftover_files = [str(p) for p in (self.sock_path, self.paths / "swarm.pid",
                                                self.paths / "run" / "relay.port") if p.exists()]
        self.leftover_sockets = _unix_sockets_under(self.home, exclude={str(self.recorder.path)})
        self.leftover_locks = _locks_under(self.home)
        ws = self.home / "ws"
        self.workspaces_left = sorted(p.name for p in ws.iterdir()) if ws.is_dir() else []
        if self.tmpfs:
            shutil.copytree(self.paths / "logs", self.home / "logs-copy", dirs_exist_ok=True)
            shutil.copytree(self.paths / "state", self.home / "state-copy", dirs_exist_ok=True)

    def cleanup(self) -> None:
        self.stop_posting.set()
        self.stop_sampling.set()
        if self.swarm is not None:
            try:
                self.swarm.kill()
            except Exception:  # noqa: BLE001
                pass
        self.observer.close()
        self.poster.close()
        self.peers.close()
        self.stop_external_relay()
        self.recorder.close()
        if self.tmpfs:
            if subprocess.run(["umount", str(self.paths)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(self.paths)], capture_output=True)

    # ------------------------------------------------------------------ checks
    def supervisor_log(self) -> list[dict[str, Any]]:
        path = (self.home / "logs-copy" if self.tmpfs else self.paths / "logs") / "supervisor.log"
        out = []
        try:
            for line in path.read_text(errors="replace").splitlines():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        except OSError:
            pass
        return out

    def checks(self) -> list[Check]:
        logs = self.supervisor_log()
        out = [self.check_faults_injected()]
        out += self.check_tasks()
        out += self.check_runs()
        out.append(self.check_budget())
        out.append(self.check_desired())
        out.append(self.check_expectations())
        out.append(self.check_sigstop(logs))
        out.append(self.check_scale_never_active(logs))
        out.append(self.check_reloads(logs))
        out.append(self.check_disk(logs))
        out.append(self.check_state_on_disk())
        out.append(self.check_status_order())
        for name in ("status-vs-proc", "status-vs-relay", "reload-keeps-old-config", "scale",
                     "no-orphans-after-crash", "soak-internal"):
            items = self.violations.get(name, [])
            out.append(Check(name, not items, f"{len(items)} violation(s)" + (": " + "; ".join(items[:5]) if items else
                             f" in {len(self.samples)} samples" if name.startswith("status") else "")))
        out += self.check_leaks()
        out.append(self.check_flat())
        return out

    def check_faults_injected(self) -> Check:
        done = {f for _, f, d in self.faults if "no candidate" not in d and "SKIPPED" not in d
                and "no active session" not in d}
        missing = sorted(set(self.REQUIRED) - done - ({"disk-full"} if not self.tmpfs else set()))
        counts: dict[str, int] = {}
        for _, f, _d in self.faults:
            counts[f] = counts.get(f, 0) + 1
        detail = ", ".join(f"{k}×{v}" for k, v in sorted(counts.items()))
        if self.skipped:
            detail += "; skipped: " + "; ".join(self.skipped)
        return Check("every fault injected", not missing, (f"missing {missing}; " if missing else "") + detail)

    def check_tasks(self) -> list[Check]:
        tasks = self.final["tasks"]
        seen = self.observer.task_lines
        lost = [p.id for p in self.posted.values() if p.id not in tasks
                and (p.certain if p.via == "cli" else p.id in seen)]
        unsent = [p.id for p in self.posted.values() if p.via == "channel" and p.id not in seen]
        states: dict[str, int] = {}
        for t in tasks.values():
            states[t["state"]] = states.get(t["state"], 0) + 1
        unknown = sorted(set(tasks) - set(self.posted) - {p.id for p in self.posted.values()})
        stuck = []
        earlier = self.final["tasks_earlier"]
        for t in tasks.values():
            live = len(self.final["live_sessions"].get(t["id"], []))
            if t["state"] == "running" and live == 1:
                continue  # still working when the soak ended: not stuck (the stop requeues it)
            if t["state"] in ("announced", "assigned", "running"):
                before = earlier.get(t["id"], {})
                if (before.get("state"), before.get("agent"), before.get("started")) != \
                        (t["state"], t["agent"], t.get("started")):
                    continue  # it just moved: a snapshot of a busy swarm, not a stuck task
                stuck.append(f"{t['id']} {t['state']} agent={t['agent']} live={live}, "
                             f"unchanged for {STUCK_CONFIRM_S:g} s")
        no_reason = [t["id"] for t in tasks.values() if t["state"] in ("failed", "blocked", "cancelled") and not t["reason"]]
        wrong = []
        for t in tasks.values():
            mode = self.posted[t["id"]].mode.split(":")[0] if t["id"] in self.posted else ""
            if t["state"] == "done" and mode and mode not in SUCCESS_MODES:
                wrong.append(f"{t['id']} [{mode}] done")
        return [
            Check("no task lost", not lost, f"{len(self.posted)} posted ({self.refused_posts} refused while down), "
                  f"{len(lost)} missing" + (f": {lost[:10]}" if lost else "")
                  + (f"; channel posts the relay never delivered (not counted): {unsent}" if unsent else "") + f"; states {states}"),
            Check("no task stuck open", not stuck, f"{len(stuck)} open after drain" + (f": {stuck[:8]}" if stuck else "")),
            Check("failures carry a reason", not no_reason, f"{len(no_reason)} without" + (f": {no_reason[:10]}" if no_reason else "")),
            Check("outcome matches the fake's mode", not wrong, f"{len(wrong)} wrong" + (f": {wrong[:10]}" if wrong else "")),
            Check("no unknown tasks", not unknown, f"{len(unknown)} not posted by the soak" + (f": {unknown[:10]}" if unknown else "")),
        ]

    def check_runs(self) -> list[Check]:
        runs = self.recorder.snapshot()
        by_task: dict[str, list[Run]] = {}
        for r in runs:
            by_task.setdefault(r.task, []).append(r)
        overlaps, done_without, repeated = [], [], []
        for task, rs in by_task.items():
            rs.sort(key=lambda r: r.start)
            for a, b in zip(rs, rs[1:]):
                if a.end is None or b.start < a.end:
                    overlaps.append(f"{task}: run {a.pid} [{a.start:.2f}-{a.end}] and {b.pid} started {b.start:.2f}")
        for t in self.final["tasks"].values():
            ok = [r for r in by_task.get(t["id"], []) if r.rc == 0]
            if t["state"] == "done" and not ok:
                done_without.append(t["id"])
            if len(ok) > 1:
                repeated.append(f"{t['id']}×{len(ok)}")
        unended = [f"{r.task}:{r.pid}" for r in runs if r.end is None]
        return [
            Check("no task ran twice at once", not overlaps, f"{len(runs)} sessions recorded, {len(overlaps)} overlaps"
                  + (f": {overlaps[:5]}" if overlaps else "")),
            Check("done means a session succeeded", not done_without,
                  f"{len(done_without)} done without a successful session" + (f": {done_without[:10]}" if done_without else "")),
            Check("completed once (sequential re-runs)", None if repeated else True,
                  f"{len(repeated)} tasks whose session succeeded more than once (a daemon died between "
                  f"the session's end and its report; at-least-once)" + (f": {repeated[:10]}" if repeated else "")),
            Check("every session ended", not unended, f"{len(unended)} still alive after the stop" + (f": {unended[:10]}" if unended else "")),
        ]

    def check_budget(self) -> Check:
        used = self.final["status"]["supervisor"]["budget"]["used"]
        total = sum(t["tokens"] for t in self.final["tasks"].values())
        disk = self.final["budget_disk"].get("used")
        ok = used == total and (disk is None or disk == used)
        return Check("budget used = sum of task tokens", ok, f"status {used}, tasks {total}, budget.json {disk}")

    def check_desired(self) -> Check:
        sup = self.final["status"]["supervisor"]
        n = len([a for a in self.final["status"]["agents"] if a["status"] != "stopping"])
        degraded = [a["name"] for a in self.final["status"]["agents"] if a["status"] == "degraded"]
        ok = sup["desired"] == self.desired_expected == n
        return Check("desired count = last scale = agents", ok,
                     f"expected {self.desired_expected}, status desired {sup['desired']}, agents {n}"
                     + (f", degraded {degraded}" if degraded else ""))

    def check_expectations(self) -> Check:
        late = [e.what + ("" if e.met_at is None else f" (late by {e.met_at - e.deadline:.1f}s)")
                for e in self.expectations if e.met_at is None or e.met_at > e.deadline]
        return Check("recoveries happened in time", not late,
                     f"{len(self.expectations) - len(late)}/{len(self.expectations)} met" + (f"; late/missing: {late[:6]}" if late else ""))

    def check_sigstop(self, logs: list[dict[str, Any]]) -> Check:
        problems, notes = [], []
        for raw in self.sigstop_notes:
            n = json.loads(raw)
            kills = [_ts(e) for e in logs if e.get("event") == "heartbeat-dead" and e.get("agent") == n["name"]
                     and n["t_stop"] - 1 <= _ts(e) <= n["t_cont"] + 1]
            if not kills:
                problems.append(f"{n['name']} stopped {n['t_cont'] - n['t_stop']:.1f}s was never declared dead")
                continue
            after = kills[0] - n["t_stop"]
            lo, hi = (HB_MISSES - 1) * HB_INTERVAL, HB_MISSES * HB_INTERVAL + HB_INTERVAL / 2 + 1.0
            notes.append(f"{n['name']} declared dead {after:.1f}s after SIGSTOP (allowed {lo:.0f}-{hi:.1f})")
            if not lo <= after <= hi:
                problems.append(notes[-1])
        return Check("SIGSTOP: dead only after the misses", not problems and bool(notes),
                     "; ".join(problems or notes) or "no SIGSTOP fault ran")

    def check_scale_never_active(self, logs: list[dict[str, Any]]) -> Check:
        """A session cancelled before the final stop can only come from retiring an active agent."""
        stop_t = min((_ts(e) for e in logs if e.get("event") == "stopping"), default=float("inf"))
        bad = [f"{e.get('task')} ({e.get('agent')}): {e.get('msg')}" for e in logs
               if str(e.get("event", "")).startswith("task-") and "cancelled" in str(e.get("msg", ""))
               and _ts(e) < stop_t - 0.5 and not _near_sup_kill(_ts(e), self.faults)]
        retired = sum(1 for e in logs if e.get("event") == "scale-down")
        return Check("scale-down never stops an active agent", not bad,
                     f"{retired} daemons retired, {len(bad)} sessions cancelled" + (f": {bad[:5]}" if bad else ""))

    def check_reloads(self, logs: list[dict[str, Any]]) -> Check:
        ok_lines = [e["msg"] for e in logs if e.get("event") == "reload"]
        failed = [e["msg"] for e in logs if e.get("event") == "reload-failed"]
        n_bad = sum(1 for k in self.hup_notes if k in ("broken", "deleted"))
        changed = [m for m in ok_lines if "max-active" in m]
        n_valid = sum(1 for _, f, _d in self.faults if f == "sighup-valid")
        ok = len(failed) >= n_bad and len(changed) >= n_valid
        return Check("SIGHUP: applied when valid, refused otherwise", ok,
                     f"{len(ok_lines)} applied ({len(changed)} naming max-active, {n_valid} expected), "
                     f"{len(failed)} refused ({n_bad} expected)" + (f"; applied: {ok_lines[:4]}" if not ok else ""))

    def check_disk(self, logs: list[dict[str, Any]]) -> Check:
        if not self.tmpfs:
            return Check("disk full: survives, resumes writing", None, f"skipped: {self.tmpfs_reason}")
        problems = []
        for raw in self.disk_notes:
            t_free = float(raw)
            later = [e for e in logs if _ts(e) > t_free + 0.5]
            if not later:
                problems.append("no log line written after space was freed")
        return Check("disk full: survives, resumes writing", not problems and bool(self.disk_notes),
                     "; ".join(problems) or f"{len(self.disk_notes)} episode(s); logs resumed after each")

    def check_status_order(self) -> Check:
        """STATUS lines reach the channel in order, also across relay outages.

        The fake's slow sessions report "step i of n"; within one attempt (from one
        agent's "Starting work" line or verdict to the next: every new attempt by the
        same agent follows a verdict of its own, FAIL interrupted after a crash) i never
        goes down. A resent line after a reconnect may repeat a step, never go back.
        """
        step = re.compile(r"step (\d+) of \d+")
        last: dict[tuple[str, str], int] = {}
        done: set[str] = set()
        problems: list[str] = []
        statuses = 0
        for verb, task, agent, text in self.observer.task_stream:
            if verb == "GAP":  # the observer reconnected: it may have missed a verdict
                last.clear()
                continue
            if verb != "STATUS":
                last.pop((task, agent), None)
                if verb == "DONE":
                    done.add(task)
                continue
            statuses += 1
            if text.startswith("Starting work"):
                last.pop((task, agent), None)
            found = step.search(text)
            if found:
                i = int(found.group(1))
                if i < last.get((task, agent), 0):
                    problems.append(f"{task} {agent}: step {i} after step {last[(task, agent)]}")
                last[(task, agent)] = i
        return Check("STATUS lines in order", not problems and statuses > 0,
                     f"{statuses} STATUS lines, {len(done)} DONE" +
                     (f"; {len(problems)} out of order: {problems[:5]}" if problems else ""))

    def check_state_on_disk(self) -> Check:
        live, disk = self.final["tasks_live"], self.final["tasks_disk"]
        diff = [i for i in live if i not in disk or {k: disk[i].get(k) for k in ("state", "tokens", "agent")}
                != {k: live[i].get(k) for k in ("state", "tokens", "agent")}]
        return Check("tasks.json matches the live list", not diff,
                     f"{len(live)} live, {len(disk)} on disk, {len(diff)} differ" + (f": {diff[:8]}" if diff else ""))

    def check_leaks(self) -> list[Check]:
        persist = self.args.persist
        if persist:
            lost = sorted(n for n in self.agent_names if not (self.home / "ws" / n / ".agentchat").is_dir())
            ws = Check("no workspace lost (persist)", not lost,
                       f"{len(self.agent_names)} agents seen, {len(lost)} workspaces missing" + (f": {lost}" if lost else ""))
        else:
            ws = Check("no workspace left (persist false)", not self.workspaces_left,
                       f"{len(self.workspaces_left)} left" + (f": {self.workspaces_left}" if self.workspaces_left else ""))
        return [
            Check("clean stop", self.stop_result == (0, 0) and not self.stop_checks,
                  f"`swarm stop` exit {self.stop_result[0]}, supervisor exit {self.stop_result[1]}"
                  + ("; " + "; ".join(self.stop_checks) if self.stop_checks else "")),
            Check("no process left", not self.leftover_procs,
                  f"{len(self.leftover_procs)} left" + (f": {self.leftover_procs[:5]}" if self.leftover_procs else "")),
            Check("no cgroup left", not self.leftover_cgroups,
                  f"{len(self.leftover_cgroups)} left" + (f": {self.leftover_cgroups[:5]}" if self.leftover_cgroups else "")),
            Check("no socket, pidfile or lock left", not (self.leftover_files or self.leftover_sockets or self.leftover_locks),
                  f"files {self.leftover_files}, bound sockets {self.leftover_sockets[:5]}, locks {self.leftover_locks[:5]}"),
            ws,
        ]

    def check_flat(self) -> Check:
        """Supervisor RSS and fds: first vs last quarter medians of each long-lived incarnation,
        over samples with the same number of live daemons (each daemon holds fds legitimately)."""
        notes, problems = [], []
        for pid, rows in self.metrics.items():
            if len(rows) < 40:
                continue
            rows = rows[10:]  # warm-up: imports, first spawns
            n_mode = statistics.mode(r[3] for r in rows)
            same = [r for r in rows if r[3] == n_mode]
            q = len(same) // 4
            if q < 5:
                notes.append(f"pid {pid}: too few comparable samples")
                continue
            first, last = same[:q], same[-q:]
            rss0, rss1 = statistics.median(r[1] for r in first), statistics.median(r[1] for r in last)
            fd0, fd1 = statistics.median(r[2] for r in first), statistics.median(r[2] for r in last)
            notes.append(f"pid {pid} ({len(rows)} samples, {n_mode} daemons): RSS {rss0 / 1024:.1f}->{rss1 / 1024:.1f} MB, fds {fd0:.0f}->{fd1:.0f}")
            if rss1 - rss0 > max(6 * 1024, 0.15 * rss0):
                problems.append(f"RSS grew {rss0 / 1024:.1f}->{rss1 / 1024:.1f} MB (pid {pid})")
            if fd1 - fd0 > max(4, 0.1 * fd0):
                problems.append(f"fds grew {fd0:.0f}->{fd1:.0f} (pid {pid})")
        return Check("supervisor RSS and fds flat", not problems if notes else None,
                     "; ".join(problems + notes) or "no incarnation lived long enough to compare")

    def report_context(self, checks: list[Check]) -> None:
        print(f"\nhome: {self.home} (supervisor.stderr, logs{'-copy' if self.tmpfs else ''}/supervisor.log)")
        print(f"faults: {len(self.faults)}; samples: {len(self.samples)}; sessions: {len(self.recorder.snapshot())}; "
              f"flood: {self.flood_stats}")
        failed = [c.name for c in checks if c.ok is False]
        print("RESULT: " + ("PASS" if not failed else f"FAIL ({len(failed)}: {', '.join(failed)})"))


# --------------------------------------------------------------------------- helpers


def _write_atomic(path: Path, config: dict[str, Any]) -> None:
    import yaml
    tmp = path.with_name(path.name + ".soak-tmp")
    tmp.write_text(yaml.safe_dump(config))
    os.replace(tmp, path)


def _ancestors(pid: int) -> list[int]:
    out = []
    while pid > 1:
        st = proc_stat(pid)
        if st is None:
            break
        pid = st[0]
        out.append(pid)
    return out


def _ts(entry: dict[str, Any]) -> float:
    import datetime
    try:
        text = str(entry["ts"]).replace("Z", "+00:00")
        return datetime.datetime.fromisoformat(text).timestamp()
    except (KeyError, ValueError):
        return 0.0


def _near_sup_kill(t: float, faults: list[tuple[float, str, str]]) -> bool:
    return any(f == "kill-supervisor" and 0 <= t - ft <= 20 for ft, f, _ in faults)


def _cgroup_name(paths: Path) -> str:
    import hashlib
    return f"agentctl-swarm-{os.getuid()}-{hashlib.sha256(str(paths).encode()).hexdigest()[:10]}"


def _find_cgroups(name: str) -> list[str]:
    found = []
    for base in (Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup")):
        if not base.is_dir():
            continue
        for dirpath, dirnames, _ in os.walk(base):
            for d in dirnames:
                if d == name:
                    found.append(os.path.join(dirpath, d))
            if dirpath.count("/") > 9:
                dirnames[:] = []
    return sorted(set(found))


def _unix_sockets_under(home: Path, exclude: set[str]) -> list[str]:
    out = []
    try:
        for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 8 and parts[7].startswith(str(home)) and parts[7] not in exclude:
                out.append(parts[7])
    except OSError:
        pass
    return out


def _locks_under(home: Path) -> list[str]:
    inodes = {}
    for dirpath, dirnames, filenames in os.walk(home):
        for f in filenames:
            p = os.path.join(dirpath, f)
            try:
                inodes[os.lstat(p).st_ino] = p
            except OSError:
                pass
    out = []
    try:
        for line in Path("/proc/locks").read_text().splitlines():
            parts = line.split()
            dev_ino = next((x for x in parts if x.count(":") == 2), None)
            if dev_ino and int(dev_ino.split(":")[2]) in inodes:
                out.append(f"{inodes[int(dev_ino.split(':')[2])]}: {line}")
    except OSError:
        pass
    return out


def print_table(checks: list[Check]) -> None:
    width = max(len(c.name) for c in checks)
    print("\n" + "=" * 100)
    print(f"{'check'.ljust(width)}  result  detail")
    print("-" * 100)
    for c in checks:
        mark = "PASS" if c.ok else ("info" if c.ok is None else "FAIL")
        print(f"{c.name.ljust(width)}  {mark:<6}  {c.detail}")
    print("=" * 100)


def send_signal(pid: int, sig: int) -> bool:
    """Signal ``pid``; False if it is gone (a status snapshot is a moment old)."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--relay", choices=("embedded", "external"), default="embedded")
    parser.add_argument("--persist", action="store_true")
    parser.add_argument("--count", type=int, default=4, help="initial daemons")
    parser.add_argument("--tmp", default=None, help="parent directory of the soak's HOME")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return Soak(args).run()
    except (SwarmError, RuntimeError, OSError) as exc:
        traceback.print_exc()
        print(f"soak aborted: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
