"""One daemon per slot: idle on the work channel, claim tasks, run sessions.

States (``Status``): starting -> idle -> promoting -> active -> demoting -> idle.
Transitions live in ``TRANSITIONS`` and every change goes through ``_set_status``,
which tells the supervisor. The daemon is told everything by the supervisor over
its IPC socket (the ``boot`` message); it writes nothing outside its workspace
and logs through the IPC channel, so the supervisor owns the log files.

An idle daemon never starts a session on its own: an ASSIGN from the
coordinator only makes it *ask* the supervisor (``promote``); it runs the
session after ``approve`` and reports DONE, FAIL or BLOCKED when it ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import logging
import os
import random
import signal
import socket
import sys
import time
from collections import OrderedDict
from collections.abc import Coroutine, Iterator
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from . import ipc, verbs, workspace
from .system import proc
from .workspace import ContextState, WorkspaceSpec

T = TypeVar("T")

log = logging.getLogger("agentctl_swarm.daemon")

EXIT_OK = 0
EXIT_BOOT_FAILED = 3  # workspace or identity could not be prepared: do not retry blindly
CLAIM_JITTER_S = 0.3
MAX_OFFERS = 64
READ_GAP_S = 0.25  # under a stream of channel frames, read in batches (agentchat._ws)


class Status(str, Enum):
    STARTING = "starting"
    IDLE = "idle"
    PROMOTING = "promoting"
    ACTIVE = "active"
    DEMOTING = "demoting"
    STOPPING = "stopping"


TRANSITIONS: dict[Status, set[Status]] = {
    Status.STARTING: {Status.IDLE, Status.STOPPING},
    Status.IDLE: {Status.PROMOTING, Status.STOPPING},
    Status.PROMOTING: {Status.ACTIVE, Status.DEMOTING, Status.STOPPING},
    Status.ACTIVE: {Status.DEMOTING, Status.STOPPING},
    Status.DEMOTING: {Status.IDLE, Status.STOPPING},
    Status.STOPPING: set(),
}


def preload() -> None:
    """Import and warm what a daemon needs (called by the fork-server before fork)."""
    import json  # noqa: F401
    from .agentchat import client  # noqa: F401
    log_to_stderr()
    from .agentchat.identity import Identity
    from . import isolation, session, taskrunner  # noqa: F401
    identity = Identity.generate("warmup")
    identity.sign_auth("nonce", "challenge", 0)
    verbs.parse("HEARTBEAT warmup idle")


REHEARSALS = 2  # throw-away boots in the fork-server; the first does most (measured)
# True while the rehearsal runs what no daemon runs: its relay, the stand-in
# supervisor, its scratch directory. An asyncio task and the callbacks it schedules
# inherit it; forkserver.hot_code leaves that code out of what it packs.
REHEARSAL_SCAFFOLD: contextvars.ContextVar[bool] = contextvars.ContextVar("rehearsal_scaffold",
                                                                          default=False)


@contextlib.contextmanager
def _scaffold(on: bool) -> Iterator[None]:
    """REHEARSAL_SCAFFOLD set to ``on`` for the code in the block."""
    token = REHEARSAL_SCAFFOLD.set(on)
    try:
        yield
    finally:
        REHEARSAL_SCAFFOLD.reset(token)


def rehearse(rounds: int = REHEARSALS) -> int:
    """Boot ``rounds`` throw-away daemons in this process, against an in-process relay.

    The fork-server calls this before freezing its heap. The first run of the
    daemon's code writes all over memory it would otherwise share: CPython's
    attribute cache and type version tags, specialised (quickened) bytecode,
    lazily built module state. Done once here, those pages stay shared by every
    forked daemon instead of being copied into each (an idle daemon's USS, in
    ``bench/profile_daemon.py``: 7.4 -> 6.3 MB after one round, 6.0 after ten).
    A rehearsal that fails only costs that saving: it is logged, never raised.
    Returns the number of boots that completed.
    """
    import shutil
    import tempfile
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    with _scaffold(True):
        work = Path(tempfile.mkdtemp(prefix="agentctl-rehearsal-"))
    done: list[str] = []
    try:
        run_loop(_rehearse(work, rounds, done))  # the loop runner itself: as a daemon runs it
    except Exception as exc:  # noqa: BLE001 - an optimisation, not a precondition
        log.warning("fork-server rehearsal failed (daemons still start): %s", exc)
    finally:
        with _scaffold(True):
            shutil.rmtree(work, ignore_errors=True)
        root.handlers[:] = handlers
        root.setLevel(level)
    return len(done)


async def _rehearse(work: Path, rounds: int, done: list[str]) -> None:
    from .agentchat.relay import Relay
    REHEARSAL_SCAFFOLD.set(True)  # in this task's own context: the relay and the driver
    # Uncorked: the corked relay flushes fan-out at most every 20 ms, and each rehearsal
    # waits for its heartbeat's echo, so the fork-server sat idle ~20 ms per rehearsal
    # before its first fork.
    relay = Relay(rate_limit=0, cork=0.0)
    await relay.start()
    try:
        for i in range(rounds):
            name = f"rehearsal-{i:03d}"
            await asyncio.wait_for(_rehearse_one(relay.url, work, name), 10)
            done.append(name)
    finally:
        await relay.stop()
    _warm_sandbox(work)


async def _rehearse_one(url: str, work: Path, name: str) -> None:
    """One boot as the supervisor would drive it: hello, boot, ready, a heartbeat, stop.
    The daemon connects to the relay itself: rehearsing the handover instead (as
    spawner.handed_fds hands it) left daemons 0.13 MB larger when measured, and made
    no difference beyond the noise once the scaffold was left out of the packing."""
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.setblocking(False)
    spec = WorkspaceSpec(name=name, role="general", path=str(work / name), channels=["#agents"],
                         repo=None, instructions="", swarm_id=str(work))
    boot = {"t": "boot", "workspace": spec.__dict__, "server": url, "channels": ["#agents"],
            "send_interval": 0.0, "heartbeat_interval": 30.0, "status_interval": 10.0,
            "max_task_duration": 60.0, "shutdown_grace": 1.0, "agent_command": ["true"],
            "agent_env": {}, "coordinator_id": "", "cgroup": None, "sandbox": None, "grants": []}
    ready: asyncio.Future[None] = loop.create_future()

    def on_message(msg: dict[str, Any]) -> None:
        if msg["t"] == "hello":
            channel.send(boot)
        elif msg["t"] == "ready" and not ready.done():
            ready.set_result(None)

    daemon = Daemon(theirs)
    own = contextvars.copy_context()
    own.run(REHEARSAL_SCAFFOLD.set, False)
    running = loop.create_task(daemon.run(), context=own)
    channel = await ipc.open_channel(ours, on_message, lambda exc: None)
    try:
        await ready
        while daemon.client is not None and daemon.client.queued:  # until the heartbeat is echoed
            await asyncio.sleep(0.001)  # a few turns at most: the fork-server waits on this
        channel.send({"t": "stop"})
        await running
    finally:
        channel.close()
        running.cancel()


def _warm_sandbox(work: Path) -> None:
    """Complete (but never enforce) a Landlock ruleset, as each daemon's confinement
    completes the one the supervisor hands it (isolation.confine_daemon)."""
    from .system import sandbox
    if sandbox.landlock_abi() < 1:
        return
    (work / "ws").mkdir()
    (work / "tmp").mkdir()
    # The supervisor's half (isolation.daemon_ruleset) is scaffold; the daemon's is not.
    fd = sandbox.prepare_landlock(sandbox.shared_policy(["/usr"], work, (str(work), frozenset(["/usr"]))))
    try:
        with _scaffold(False):
            sandbox.add_landlock_rules(fd, read_write=sandbox.own_grants(work / "ws", work / "tmp"))
    finally:
        os.close(fd)


class IpcLogHandler(logging.Handler):
    """Sends log records to the supervisor, which writes files and the journal."""

    def __init__(self, daemon: "Daemon") -> None:
        super().__init__(logging.INFO)
        self.daemon = daemon

    def emit(self, record: logging.LogRecord) -> None:
        msg = {"t": "log", "level": record.levelname.lower(), "msg": record.getMessage()[:4000]}
        for key in ("task", "event"):
            value = getattr(record, key, None)
            if isinstance(value, str):
                msg[key] = value
        self.daemon.send_ipc(msg)


class Daemon:
    """The daemon's event loop side; one instance per process."""

    def __init__(self, ipc_sock: socket.socket, ruleset_fd: int | None = None,
                 relay_fd: int | None = None, shared_fd: int | None = None) -> None:
        self.sock = ipc_sock
        self.ruleset_fd = ruleset_fd  # our Landlock ruleset, built by the supervisor (_confine)
        self.shared_fd = shared_fd  # the Landlock layer all daemons share, if it split them
        self.relay_fd = relay_fd  # our first relay connection, opened by the supervisor (_start_link)
        self.status = Status.STARTING
        self.boot: dict[str, Any] = {}
        self.spec: WorkspaceSpec | None = None
        self.client: Any = None
        self.channel: ipc.Channel | None = None
        self.offers: OrderedDict[str, str] = OrderedDict()  # task id -> prompt
        self.claimed: str | None = None  # task we claimed and await ASSIGN/approval for
        self.runner: Any = None  # the TaskRunner of the active task
        self._booted: asyncio.Future[dict[str, Any]] | None = None
        self._stopped: asyncio.Future[int] | None = None
        self._hb: asyncio.TimerHandle | None = None
        self.confinement = "none"
        self._boot_marks: list[float] = []
        self._wakeup: tuple[socket.socket, socket.socket] | None = None  # see _catch_stop_signals

    # --- lifecycle -------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._booted = loop.create_future()
        self._stopped = loop.create_future()
        self._catch_stop_signals(loop)
        self.channel = await ipc.open_channel(self.sock, self._on_ipc, self._on_ipc_closed)
        self.send_ipc({"t": "hello", "pid": os.getpid(), "name": ""})
        try:
            self.boot = await self._booted
        except ConnectionError:
            return EXIT_OK  # an orphaned start (e.g. a late fork-server answer): nothing to do
        marks = [time.monotonic()]  # boot phases (ipc.BOOT_PHASES), sent with the first "ready"
        root = logging.getLogger()
        for handler in list(root.handlers):  # from here on the supervisor writes our logs
            root.removeHandler(handler)
        root.addHandler(IpcLogHandler(self))
        root.setLevel(logging.INFO)
        try:
            if self.boot["workspace"].get("repo"):
                self._schedule_heartbeat()  # a clone can take minutes: stay visibly alive
                identity = await asyncio.to_thread(self._prepare)
            else:
                identity = self._prepare()
        except Exception as exc:  # noqa: BLE001 - reported, then a distinct exit code
            self.send_ipc({"t": "fatal", "reason": f"boot failed: {exc}"[:2000]})
            await asyncio.sleep(0.05)
            return EXIT_BOOT_FAILED
        marks.append(time.monotonic())
        self.confinement = self._confine()
        marks.append(time.monotonic())
        self._boot_marks = marks
        self._start_link(identity)
        self._report_interrupted()
        self._set_status(Status.IDLE)
        code = await self._stopped
        await self._shutdown()
        return code

    def _catch_stop_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        """SIGTERM and SIGINT ask the daemon to stop: what ``loop.add_signal_handler``
        arranges, without its enum conversions (see ``proc.set_signal``; 0.3 MB per
        daemon). The C-level handler writes the signal's number to a socket the loop
        watches, so a signal delivered to any thread wakes the loop; the Python-level
        handler, run in the main thread, hands the stop over to the loop."""
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        loop.add_reader(wake_r.fileno(), _drain, wake_r)
        self._wakeup = (wake_r, wake_w)

        def on_signal(signum: int, _frame: Any) -> None:
            loop.call_soon_threadsafe(self.request_stop, "SIGTERM" if signum == signal.SIGTERM else "SIGINT")
        for sig in (signal.SIGTERM, signal.SIGINT):
            proc.set_signal(sig, on_signal)
            signal.siginterrupt(sig, False)

    def _release_stop_signals(self) -> None:
        """Undo _catch_stop_signals, as the loop's close would: the defaults are back."""
        if self._wakeup is None:
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            proc.set_signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        asyncio.get_running_loop().remove_reader(self._wakeup[0].fileno())
        for sock in self._wakeup:
            sock.close()
        self._wakeup = None

    def _prepare(self) -> Any:
        from .system.title import set_title
        self.spec = WorkspaceSpec(**self.boot["workspace"])
        set_title(f"agentctl-swarm daemon {self.spec.name}")
        return workspace.prepare(self.spec)

    def _confine(self) -> str:
        """Confine this daemon to its workspace where that does not hinder it."""
        from .isolation import confine_daemon
        assert self.spec is not None
        ruleset_fd, self.ruleset_fd = self.ruleset_fd, None
        shared_fd, self.shared_fd = self.shared_fd, None
        try:
            return confine_daemon(self.boot.get("sandbox"), self.spec.root, self.spec.tmp_dir,
                                  self.boot.get("grants", []), ruleset_fd, shared_fd)
        except Exception as exc:  # noqa: BLE001 - an unconfined daemon still works; say so
            log.warning("daemon not confined: %s", exc, extra={"event": "sandbox"})
            return "none"

    def _start_link(self, identity: Any) -> None:
        from .agentchat.client import AgentChatClient
        handover = None
        if self.relay_fd is not None:
            sock, self.relay_fd = socket.socket(fileno=self.relay_fd), None
            given = self.boot.get("relay_handover")
            if given:
                handover = (sock, given["uri"], bytes.fromhex(given["received"]))
            else:
                sock.close()
        self.client = AgentChatClient(
            self.boot["server"], identity, list(self.boot["channels"]),
            on_message=self._on_chat, on_event=self._on_link_event,
            send_interval=float(self.boot.get("send_interval", 1.0)),
            # a heartbeat not echoed before the next one is due means a dead link
            ack_timeout=min(10.0, max(2.0, float(self.boot.get("heartbeat_interval", 30.0)))),
            keepalive=None,  # the echo of each heartbeat already proves the link alive
            read_gap=READ_GAP_S,
            ignore_heartbeats=True,  # _on_chat drops them; do not parse ~N per start of N
            handover=handover)
        asyncio.get_running_loop().create_task(self.client.run())

    def request_stop(self, why: str = "") -> None:
        if self._stopped is not None and not self._stopped.done():
            log.info("stopping (%s)", why or "requested", extra={"event": "stop"})
            self._stopped.set_result(EXIT_OK)

    async def _shutdown(self) -> None:
        if self._hb is not None:
            self._hb.cancel()
        if self.runner is not None:
            await self.runner.cancel(float(self.boot.get("shutdown_grace", 10.0)))
        self.status = Status.STOPPING
        if self.client is not None:
            await self.client.close()
        if self.channel is not None:
            self.channel.close()
        self._release_stop_signals()

    # --- IPC -------------------------------------------------------------
    def send_ipc(self, msg: dict[str, Any]) -> None:
        if self.channel is not None:
            self.channel.send(msg)

    def _on_ipc_closed(self, exc: Exception | None) -> None:
        if self._booted is not None and not self._booted.done():
            self._booted.set_exception(ConnectionError("the supervisor closed the IPC channel before boot"))
        self.request_stop("supervisor closed the IPC channel")

    def _on_ipc(self, msg: dict[str, Any]) -> None:
        handler = getattr(self, f"_ipc_{msg['t']}", None)
        if handler is None:
            log.warning("unknown IPC message %r from the supervisor", msg["t"])
            return
        handler(msg)

    def _ipc_boot(self, msg: dict[str, Any]) -> None:
        if self._booted is not None and not self._booted.done():
            self._booted.set_result(msg)

    def _ipc_set(self, msg: dict[str, Any]) -> None:
        """Settings that apply at once (reload)."""
        for key in ("heartbeat_interval", "status_interval", "max_task_duration"):
            if key in msg:
                self.boot[key] = msg[key]
        self._schedule_heartbeat()

    def _ipc_approve(self, msg: dict[str, Any]) -> None:
        task_id = msg.get("task_id")
        probe = bool(msg.get("probe"))
        if (task_id != self.claimed and not probe) or self.status is not Status.IDLE:
            self.send_ipc({"t": "log", "level": "warning", "event": "promote",
                           "msg": f"approval for {task_id} that is not pending; ignored"})
            return
        from .taskrunner import TaskRunner
        prompt = self.offers.get(task_id, msg.get("prompt", ""))
        self.runner = TaskRunner(self, str(task_id), str(msg.get("prompt") or prompt), probe=probe)
        asyncio.get_running_loop().create_task(self.runner.run())

    def _ipc_deny(self, msg: dict[str, Any]) -> None:
        task_id = msg.get("task_id")
        if task_id == self.claimed:
            self.claimed = None
            self.say(verbs.format(verbs.Unclaim(task_id, self.name)))
            log.info("promotion of %s denied (%s); unclaimed", task_id, msg.get("reason", ""),
                     extra={"task": task_id, "event": "unclaim"})

    def _ipc_cancel(self, msg: dict[str, Any]) -> None:
        if self.runner is not None and self.runner.task_id == msg.get("task_id"):
            asyncio.get_running_loop().create_task(self.runner.cancel(float(msg.get("grace", 10))))

    def _ipc_stop(self, msg: dict[str, Any]) -> None:
        self.request_stop("supervisor asked")

    # --- status and heartbeats --------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name if self.spec else "?"

    @property
    def role(self) -> str:
        return self.spec.role if self.spec else "general"

    @property
    def work_channel(self) -> str:
        return str(self.boot["channels"][0])

    def _set_status(self, new: Status) -> None:
        if new not in TRANSITIONS[self.status]:
            log.error("refused status change %s -> %s", self.status.value, new.value)
            return
        self.status = new
        self.heartbeat()

    def heartbeat(self) -> None:
        """Heartbeat now (channel and supervisor), then every heartbeat-interval."""
        connected = bool(self.client is not None and self.client.connected)
        if connected:
            self.say(verbs.format(verbs.Heartbeat(self.name, self.status.value)))
        queued = int(getattr(self.client, "queued", 0) or 0)
        self.send_ipc({"t": "heartbeat", "status": self.status.value, "connected": connected,
                       "queued": queued})
        self._schedule_heartbeat()

    def _schedule_heartbeat(self) -> None:
        """Next heartbeat at the next multiple of heartbeat-interval on the wall clock.

        Aligned on purpose: every daemon on the channel receives every heartbeat, so
        the swarm's beats in one burst reach each daemon in one or two wake-ups
        (the relay batches per turn), where beats spread over the interval would wake
        every daemon once per beat — N² wake-ups of a cold process per interval.
        Never later than one interval from now, so the health monitor's deadline holds.
        """
        if self._hb is not None:
            self._hb.cancel()
        interval = float(self.boot.get("heartbeat_interval", 30.0))
        delay = max(interval - time.time() % interval, 0.05)
        self._hb = asyncio.get_running_loop().call_later(delay, self.heartbeat)

    def say(self, line: str) -> None:
        """Send one line to the work channel (queued while disconnected)."""
        if self.client is not None:
            self.client.send(self.work_channel, line)

    def _on_link_event(self, event: str, detail: dict[str, Any]) -> None:
        if event == "connected":
            ready = {"t": "ready", "agent_id": str(detail.get("agent_id", "")),
                     "lurk": bool(detail.get("lurk", False)), "confined": self.confinement}
            if self._boot_marks:  # the first connect ends the boot: say where its time went
                m = self._boot_marks + [time.monotonic()]
                ready["boot_ms"] = {phase: round((b - a) * 1000, 1) for phase, a, b in
                                    zip(ipc.BOOT_PHASES, m, m[1:])}
                self._boot_marks = []
            self.send_ipc(ready)
            if detail.get("lurk"):
                log.warning("agentchat says this identity is lurking (lurk_until %s)",
                            detail.get("lurk_until"), extra={"event": "lurk"})
            self.heartbeat()
            return
        safe = {k: v for k, v in detail.items() if isinstance(v, (str, int, float, bool))}
        self.send_ipc({"t": "link", "event": event[:64], "detail": safe})

    # --- the work channel --------------------------------------------------
    def _on_chat(self, frame: dict[str, Any]) -> None:
        content = frame.get("content")
        if not isinstance(content, str) or frame.get("to") not in self.boot["channels"]:
            return
        if content.startswith("HEARTBEAT "):
            return  # the common case, and nothing for a daemon to do
        try:
            verb = verbs.parse(content)
        except verbs.VerbError as exc:
            log.info("dropped malformed line from %s: %s", str(frame.get("from"))[:40], exc,
                     extra={"event": "bad-line"})
            return
        if verb is not None:
            self._on_verb(verb, str(frame.get("from", "")))

    def _on_verb(self, verb: Any, sender: str) -> None:
        if isinstance(verb, verbs.Task):
            self._offered(verb)
        elif isinstance(verb, verbs.Claim) and verb.agent != self.name:
            self.offers.pop(verb.task_id, None)  # someone was faster; do not pile on
        elif isinstance(verb, (verbs.Assign, verbs.Rejected)):
            self._decided(verb, sender)

    def _offered(self, task: Any) -> None:
        if task.role not in ("any", self.role) or self.status is not Status.IDLE or self.claimed:
            return
        self.offers[task.task_id] = task.prompt
        while len(self.offers) > MAX_OFFERS:
            self.offers.popitem(last=False)
        delay = random.uniform(0, CLAIM_JITTER_S)
        asyncio.get_running_loop().call_later(delay, self._claim, task.task_id)

    def _claim(self, task_id: str) -> None:
        if task_id not in self.offers or self.claimed or self.status is not Status.IDLE:
            return
        self.claimed = task_id
        self.say(verbs.format(verbs.Claim(task_id, self.name)))

    def _decided(self, verb: Any, sender: str) -> None:
        coordinator = self.boot.get("coordinator_id")
        if coordinator and sender != coordinator:
            log.warning("ignored %s for %s from %s: not the coordinator", type(verb).__name__.upper(),
                        verb.task_id, sender[:40], extra={"event": "spoof"})
            return
        if verb.agent != self.name or verb.task_id != self.claimed:
            if verb.task_id == self.claimed and isinstance(verb, verbs.Assign):
                self.claimed = None  # assigned to someone else
            return
        if isinstance(verb, verbs.Rejected):
            self.claimed = None
            return
        self.send_ipc({"t": "promote", "task_id": verb.task_id})

    def _report_interrupted(self) -> None:
        """A task recorded as running in context.md was interrupted by a crash."""
        assert self.spec is not None
        state = workspace.read_context(self.spec)
        if state.state not in ("active", "promoting") or not state.task_id:
            return
        if not verbs.is_valid_task_id(state.task_id):
            log.warning("context.md names an invalid task id; ignored", extra={"event": "context"})
            return
        log.warning("task %s was interrupted (daemon restarted)", state.task_id,
                    extra={"task": state.task_id, "event": "interrupted"})
        self.send_ipc({"t": "interrupted", "task_id": state.task_id, "started": state.started or ""})
        self.say(verbs.format(verbs.Fail(state.task_id, self.name, "interrupted")))
        workspace.write_context(self.spec, ContextState(extra={"last_task": state.task_id}),
                                f"Task {state.task_id} was interrupted when the daemon restarted.")


def _drain(sock: socket.socket) -> None:
    """Empty the signal wake-up socket (the numbers are not needed: see on_signal)."""
    try:
        while sock.recv(4096):
            pass
    except (BlockingIOError, InterruptedError):
        pass


def log_to_stderr() -> None:
    """Logging before boot (the supervisor takes it over at boot): warnings on stderr.

    Called by ``preload`` in the fork-server, before its heap is frozen, so a forked
    daemon inherits it instead of building it (0.3 MB per daemon, measured)."""
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")


def _run(ipc_fd: int, fds: dict[str, int]) -> int:
    sock = socket.socket(fileno=ipc_fd)
    sock.setblocking(False)
    return run_loop(Daemon(sock, fds.get("ruleset"), fds.get("relay"), fds.get("shared")).run())


def run_loop(coroutine: Coroutine[Any, Any, T]) -> T:
    """What ``asyncio.run`` does, without its ``Runner``: a new event loop runs ``coroutine``
    to completion, then the same clean-up (the tasks left are cancelled and awaited,
    async generators and the default executor shut down, the loop closed).

    The Runner also makes the loop the thread's current one in the event-loop policy
    and looks at the SIGINT handler. In a freshly forked daemon that cost ~0.45 ms of
    CPU and ~55 first touches of shared pages before its first line, and idle daemons
    were 0.05-0.07 MB larger (``bench/ab_start.py``, N = 100, two A/Bs of five and six
    rounds: USS 3.89 -> 3.82 and 3.88 -> 3.83 MB). A daemon needs neither: its code asks
    for the running loop, and it handles SIGINT itself (``Daemon._catch_stop_signals``).
    The rehearsal runs under it too, so that what it warms is what daemons run."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coroutine)
    finally:
        try:
            _cancel_left(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()


def _cancel_left(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel the tasks the coroutine left behind and let them unwind (as ``asyncio.run``)."""
    left = asyncio.all_tasks(loop)
    if not left:
        return
    for task in left:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
    for task in left:
        if not task.cancelled() and task.exception() is not None:
            loop.call_exception_handler({"message": "unhandled exception during shutdown",
                                         "exception": task.exception(), "task": task})


def main_forked(ipc_fd: int, fds: dict[str, int] | None = None) -> int:
    """Entry point in a child forked by the fork-server (after apply_in_child);
    ``fds``: the other descriptors the supervisor passed, by role (spawner.spawn_daemon)."""
    return _run(ipc_fd, fds or {})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agentctl-swarm-daemon")
    parser.add_argument("--ipc-fd", type=int, required=True)
    parser.add_argument("--ruleset-fd", type=int, default=None,
                        help="a Landlock ruleset to complete and enter after boot")
    parser.add_argument("--relay-fd", type=int, default=None,
                        help="a relay connection, upgraded to WebSocket, to identify on")
    parser.add_argument("--shared-fd", type=int, default=None,
                        help="the Landlock layer all daemons share, entered before the ruleset")
    args = parser.parse_args(argv)
    log_to_stderr()
    fds = {"ruleset": args.ruleset_fd, "relay": args.relay_fd, "shared": args.shared_fd}
    return _run(args.ipc_fd, {role: fd for role, fd in fds.items() if fd is not None})


if __name__ == "__main__":
    sys.exit(main())
