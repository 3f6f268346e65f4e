"""The supervisor: one process table, one loop.

Signal handlers only enqueue; control-socket commands await the same command
functions the signals end up in. Each turn of the loop handles what was queued,
then ``murder_daemons`` (heartbeat deadlines), ``manage_daemons`` (converge on
the desired count) and ``notify_progress`` (STATUS and the systemd watchdog,
which is therefore only pinged while the loop really turns).

Child exits arrive through the reaper (a pidfd per child), IPC messages through
each daemon's channel; both update the table directly, in the loop's thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable

from . import ipc
from .config import ConfigError, SwarmConfig, diff_configs, load_config
from .coordinator import Coordinator
from .health import HealthMonitor
from .isolation import Isolation
from .paths import SwarmPaths
from .reaper import Reaper
from .restart_policy import GiveUp, RestartTracker
from .spawner import ForkServerClient, LaunchPlan, Spawner, SpawnError, fork_exec, handed_fds
from .state import read_json, write_json_atomic
from .system import proc
from .system.cgroups import CgroupManager
from .system.journal import log_fields
from .system.notify import Notifier
from .system.pidfile import PidFile
from .workspace import WorkspaceSpec, swarm_workspaces, teardown

log = logging.getLogger("agentctl_swarm.supervisor")

KILL_AFTER_TERM_S = 3.0


class SlotStatus(str, Enum):
    STARTING = "starting"
    IDLE = "idle"
    PROMOTING = "promoting"
    ACTIVE = "active"
    DEMOTING = "demoting"
    BACKOFF = "backoff"
    DEGRADED = "degraded"
    STOPPING = "stopping"


BUSY = {SlotStatus.PROMOTING, SlotStatus.ACTIVE, SlotStatus.DEMOTING}


@dataclass
class Slot:
    """One row of the process table: an agent and its current daemon process."""

    name: str
    role: str
    index: int
    workspace: Path
    restarts: RestartTracker
    status: SlotStatus = SlotStatus.STARTING
    pid: int | None = None
    spawned_via: str = ""
    spawn_began: float = 0.0  # monotonic, when its boot-gate place was granted
    channel: ipc.Channel | None = None
    started_at: float = 0.0
    idle_since: float = 0.0
    connected: bool = False
    agent_id: str = ""
    lurk: bool = False
    task_id: str | None = None
    task_started: float | None = None
    session_pid: int | None = None
    retiring: bool = False
    last_exit: str = ""
    degraded_reason: str = ""
    link_problem: str = ""
    oom_seen: int = 0
    confined: str = "none"
    timers: list[asyncio.TimerHandle] = field(default_factory=list)

    def fields(self, **more: Any) -> dict[str, Any]:
        return log_fields(agent=self.name, role=self.role, task=self.task_id, **more)


class Supervisor:
    """Owns the daemons, the relay, the fork-server and the coordinator."""

    def __init__(self, config: SwarmConfig, *, paths: SwarmPaths, config_arg: Path | None = None,
                 count_override: int | None = None, forkserver: ForkServerClient | None = None) -> None:
        self.config = config
        self.paths = paths
        self.config_arg = config_arg
        self.count_override = count_override
        self.pid = os.getpid()
        self.started = time.time()
        self.slots: dict[str, Slot] = {}
        self.desired = config.count
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.stopping = False
        self.exit_code = 0
        self.notifier = Notifier()
        self.health = HealthMonitor(config.heartbeat_interval, config.heartbeat_misses,
                                    paths.log_dir / "health.log")
        self.pidfile = PidFile(paths.pidfile)
        self.cgroups: CgroupManager | None = None
        self.spawner = Spawner(config.spawn, self.pid, forkserver)
        self.reaper: Reaper | None = None
        self.coordinator = Coordinator(self)
        self.saved_restarts: dict[str, Any] = {}
        self.teardowns: set[asyncio.Future[bool]] = set()
        self.isolation: Isolation | None = None
        self.relay_pid: int | None = None
        self.relay_url = ""
        self.relay_restarts = RestartTracker()
        self.forkserver_restarts = RestartTracker()
        self.control: Any = None
        self.initial: set[str] = set()
        self.ready_sent = False
        self._last_status = ""
        self._last_sample = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._forkserver_start: asyncio.Future[None] | None = None

    # ------------------------------------------------------------------ run
    async def run(self) -> int:
        self._loop = asyncio.get_running_loop()
        self.reaper = Reaper(self._loop)
        try:
            await self.boot()
            await self.main_loop()
        finally:
            await self.shutdown()
        return self.exit_code

    async def boot(self) -> None:
        proc.set_child_subreaper(True)
        proc.raise_nofile_limit()
        self._install_signals()
        limited = any(self.config.for_role(r).memory_limit for r in ("builder", "auditor", "qa", "general"))
        self.cgroups = CgroupManager.detect(name=self._cgroup_name(), limit_configured=limited)
        self.cgroups.prepare_supervisor()
        for stale in self.cgroups.cleanup_stale():
            log.warning("removed cgroup %s left by a previous run", stale, extra=log_fields(event="cgroup"))
        log.info("memory limits: %s", self.cgroups.description, extra=log_fields(event="cgroup"))
        self._load_desired()
        saved, problem = read_json(self.paths.state_file("restarts"), {})
        if problem:
            log.warning("%s", problem, extra=log_fields(event="state"))
        self.saved_restarts = saved if isinstance(saved, dict) else {}
        self.isolation = Isolation.detect(self.config)
        # The fork-server preloads (~0.3 s) while the relay, the control socket and the
        # coordinator come up, and while every daemon of the swarm is prepared (its
        # cgroup, boot message, Landlock ruleset and relay connection); the spawner
        # holds the prepared starts until the preload ends (Spawner.spawn_daemon).
        self._forkserver_start = asyncio.ensure_future(self.start_forkserver())
        await self.start_relay()
        from .control.server import ControlServer
        self.control = ControlServer(self, self.paths.control_socket, self.paths.control_token)
        await self.control.start()
        await self.coordinator.start()
        self.manage_daemons()
        self.initial = set(self.slots)
        self.sweep_workspaces()
        log.info("swarm starting: %d daemons, relay %s, spawn %s", len(self.slots), self.relay_url,
                 self.config.spawn, extra=log_fields(event="start"))
        self._log_merge_pages()

    def _log_merge_pages(self) -> None:
        if not self.config.merge_pages:
            return
        if proc.ksm_running():
            log.info("merge-pages: daemons offer their memory to KSM (ksmd merges identical pages)",
                     extra=log_fields(event="start"))
        else:
            log.warning("merge-pages is on, but KSM is not running (%s is not 1; root can enable it): "
                        "no pages will be merged", proc.KSM_RUN, extra=log_fields(event="start"))

    def _cgroup_name(self) -> str:
        """Stable per swarm home, so a restart cleans what a crashed run left, and two swarms
        (two users, two test runs) never touch each other's groups."""
        import hashlib
        digest = hashlib.sha256(str(self.paths.root).encode()).hexdigest()[:10]
        return f"agentctl-swarm-{os.getuid()}-{digest}"

    def _install_signals(self) -> None:
        assert self._loop is not None
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self._loop.add_signal_handler(sig, self.queue.put_nowait, ("signal", sig))
        assert self.reaper is not None
        self._loop.add_signal_handler(signal.SIGCHLD, self.reaper.reap_strays)

    async def main_loop(self) -> None:
        while not self.stopping:
            try:
                kind, arg = await asyncio.wait_for(self.queue.get(), timeout=self._tick())
            except asyncio.TimeoutError:
                kind, arg = "tick", None
            await self.dispatch(kind, arg)
            if self.stopping:
                break
            self.murder_daemons()
            self.manage_daemons()
            self.coordinator.save_pending()
            self.coordinator.pump()
            self.notify_progress()

    def _tick(self) -> float:
        ticks = [self.health.interval / 2, 5.0]
        watchdog = self.notifier.watchdog_interval()
        if watchdog:
            ticks.append(watchdog)
        if not self.ready_sent:
            ticks.append(0.5)
        return max(0.05, min(ticks))

    async def dispatch(self, kind: str, arg: Any) -> None:
        if kind == "signal":
            await self.handle_signal(arg)
        elif kind == "respawn":
            await self.respawn(arg)
        elif kind == "call":
            arg()

    async def handle_signal(self, sig: int) -> None:
        if sig == signal.SIGHUP:
            self.reload()
        else:
            log.info("received %s: stopping", signal.Signals(sig).name, extra=log_fields(event="stop"))
            self.stopping = True

    def call_soon(self, fn: Callable[[], None]) -> None:
        self.queue.put_nowait(("call", fn))

    # ------------------------------------------------------- the relay
    async def start_relay(self) -> None:
        server = self.config.agentchat_server
        if server != "embedded":
            self.relay_url = server
            return
        port = self._relay_port()
        argv = [sys.executable, "-m", "agentctl_swarm.agentchat.relay", "--host", "127.0.0.1",
                "--port", str(port), "--rate-limit", str(self.config.agentchat_rate_limit),
                "--history-file", str(self.paths.state_dir / "relay-history.jsonl")]
        plan = LaunchPlan(name="relay", supervisor_pid=self.pid)
        self.relay_pid = fork_exec(plan, argv)
        self.relay_url = f"ws://127.0.0.1:{port}"
        assert self.reaper is not None
        self.reaper.watch(self.relay_pid, self._on_relay_exit)
        self.relay_restarts.on_start(time.monotonic())
        await _wait_for_port(port, timeout=20)

    def _relay_port(self) -> int:
        if self.relay_url:
            return int(self.relay_url.rsplit(":", 1)[1])
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return probe.getsockname()[1]

    def _on_relay_exit(self, pid: int, info: proc.ExitInfo) -> None:
        self.relay_pid = None
        if self.stopping:
            return
        decision = self.relay_restarts.on_exit(time.monotonic())
        delay = 1.0 if isinstance(decision, GiveUp) else decision.delay
        log.error("embedded relay exited (%s); restarting in %.0fs", info.reason, delay,
                  extra=log_fields(event="relay"))
        self._later(delay, lambda: self._loop.create_task(self._restart_relay()))  # type: ignore[union-attr]

    async def _restart_relay(self) -> None:
        if not self.stopping and self.relay_pid is None:
            try:
                await self.start_relay()
            except (OSError, asyncio.TimeoutError) as exc:
                log.error("relay restart failed: %s", exc, extra=log_fields(event="relay"))

    # ------------------------------------------------------- the fork-server
    async def start_forkserver(self) -> None:
        """Start the fork-server, in a task of its own. Every way it can fail (exec,
        death before or after its preload, a preload that never ends) goes through the
        restart policy; a daemon start waits for its preload at most
        FORKSERVER_WORTH_WAITING and is exec'd otherwise, so none hangs on it."""
        fs = self.spawner.forkserver
        if fs is None or self.stopping:
            return
        if fs.pid is not None and not fs.attached:  # forked by forkserver.prestart
            pid = fs.pid
            fs.attach()
        else:
            try:
                pid = self.spawner.launch_forkserver()
            except (SpawnError, OSError) as exc:
                self._forkserver_down(f"could not be started: {exc}")
                return
        assert self.reaper is not None
        self.reaper.watch(pid, self._on_forkserver_exit)
        self.forkserver_restarts.on_start(time.monotonic())
        try:
            await fs.wait_ready()
        except (SpawnError, asyncio.TimeoutError) as exc:
            if fs.pid == pid:  # alive but useless, or dead and not yet reaped: its exit decides
                log.error("fork-server %d not ready (%s); killing it", pid, exc or "timed out",
                          extra=log_fields(event="forkserver"))
                _kill(pid, signal.SIGKILL)

    def _on_forkserver_exit(self, pid: int, info: proc.ExitInfo) -> None:
        fs = self.spawner.forkserver
        assert fs is not None
        if fs.pid != pid:
            return
        fs.close()
        fs.pid = None
        self._forkserver_down(f"exited ({info.reason})")

    def _forkserver_down(self, why: str) -> None:
        if self.stopping:
            return
        decision = self.forkserver_restarts.on_exit(time.monotonic())
        if isinstance(decision, GiveUp):
            log.error("fork-server %s and keeps failing; daemons are exec'd from now on", why,
                      extra=log_fields(event="forkserver"))
            return
        log.warning("fork-server %s; restarting in %.0fs", why, decision.delay,
                    extra=log_fields(event="forkserver"))
        self._later(decision.delay, lambda: self._loop.create_task(self.start_forkserver()))  # type: ignore[union-attr]

    # ------------------------------------------------------- daemons
    def manage_daemons(self) -> None:
        """Converge on the desired count: add missing slots, retire idle surplus."""
        live = [s for s in self.slots.values() if not s.retiring]
        if len(live) < self.desired:
            self.spawn_daemons(self.desired - len(live))
        elif len(live) > self.desired:
            for slot in self._scale_down_victims(len(live) - self.desired):
                self.retire(slot)

    def spawn_daemons(self, count: int) -> None:
        taken = set(self.slots)
        plan = self.config.slot_plan(len(taken) + count)  # at least `count` of these are free
        for role, index in plan:
            if count == 0:
                break
            name = self.config.agent_name(role, index)
            if name in taken:
                continue
            slot = Slot(name, role, index, self.config.workspace_base / name, self._tracker(name))
            self.slots[name] = slot
            taken.add(name)
            count -= 1
            self._loop.create_task(self.spawn_daemon(slot))  # type: ignore[union-attr]

    def _tracker(self, name: str) -> RestartTracker:
        saved = self.saved_restarts.get(name)
        if isinstance(saved, dict):
            try:
                return RestartTracker.from_dict(saved)
            except (KeyError, TypeError, ValueError):
                log.warning("restart history of %s unreadable; starting afresh", name,
                            extra=log_fields(agent=name, event="state"))
        return RestartTracker()

    def save_restarts(self) -> None:
        history = {s.name: s.restarts.to_dict() for s in self.slots.values()}
        try:
            write_json_atomic(self.paths.state_file("restarts"), history)
        except Exception as exc:  # noqa: BLE001 - a full disk must not stop the swarm
            log.error("restart history not saved: %s", exc, extra=log_fields(event="state"))

    def _scale_down_victims(self, count: int) -> list[Slot]:
        """Never an active agent: broken or starting ones first, then the longest idle."""
        order = {SlotStatus.DEGRADED: 0, SlotStatus.BACKOFF: 1, SlotStatus.STARTING: 2,
                 SlotStatus.IDLE: 3}
        candidates = [s for s in self.slots.values()
                      if not s.retiring and s.status in order and not s.task_id]
        candidates.sort(key=lambda s: (order[s.status], s.idle_since))
        return candidates[:count]

    async def spawn_daemon(self, slot: Slot) -> None:
        """Start the daemon of ``slot``; any failure is a crash, handled by the restart policy."""
        try:
            await self._spawn_daemon(slot)
        except Exception as exc:  # noqa: BLE001 - a slot must never be left half-started
            log.exception("could not start %s", slot.name, extra=slot.fields(event="spawn"))
            if slot.pid is None:
                self._crashed(slot, f"spawn failed: {exc}")

    async def _spawn_daemon(self, slot: Slot) -> None:
        cgroup = None
        limit = self.config.for_role(slot.role).memory_limit
        if self.cgroups is not None and limit:
            group = self.cgroups.create(slot.name, limit, self.config.for_role(slot.role).cpu_weight)
            cgroup = group.to_spec()
            slot.oom_seen = group.oom_kills()
        # RLIMIT_AS is for the agent session (the task runner applies it): on the daemon itself
        # its interpreter, thread stacks and malloc arenas would use the limit up.
        joined = cgroup if cgroup and cgroup.get("enforcement") != "rlimit" else None
        plan = LaunchPlan(name=slot.name, cgroup=joined,
                          merge_pages=True if self.config.merge_pages else None)
        slot.status, slot.connected = SlotStatus.STARTING, False
        boot = self.boot_message(slot, cgroup)
        # made before the boot gate, so that waiting on the relay does not hold a place
        handed = await handed_fds(boot, self.config.workspace_base,
                                  self.isolation.rule_paths if self.isolation else None)
        try:
            await self.spawner.gate.enter(slot.name)
            slot.spawn_began = time.monotonic()
            if slot.retiring or self.stopping:
                self.spawner.gate.leave(slot.name)
                return
            pid, sock, via = await self.spawner.spawn_daemon(plan, handed)
        except (SpawnError, OSError) as exc:
            self.spawner.gate.leave(slot.name)
            log.error("could not start %s: %s", slot.name, exc, extra=slot.fields(event="spawn"))
            self._crashed(slot, f"spawn failed: {exc}")
            return
        except BaseException:
            self.spawner.gate.leave(slot.name)
            raise
        finally:
            for fd in handed.values():
                os.close(fd)
        slot.pid, slot.spawned_via, slot.started_at = pid, via, time.monotonic()
        slot.idle_since = slot.started_at
        slot.restarts.on_start(slot.started_at)
        assert self.reaper is not None
        self.reaper.watch(pid, lambda p, info, s=slot: self._on_daemon_exit(s, p, info))
        sock.setblocking(False)
        slot.channel = await ipc.open_channel(
            sock, lambda msg, s=slot: self._on_ipc(s, msg), lambda exc, s=slot: None)
        slot.channel.send(boot)
        self.health.beat(slot.name, time.monotonic())
        # The start's line at INFO is "<name> ready in ...", with the PID: one line per
        # start, not two (each is ~150 us of the supervisor's CPU, three handlers).
        log.debug("started %s (pid %s, %s)", slot.name, pid, via, extra=slot.fields(event="spawn"))

    def boot_message(self, slot: Slot, cgroup: dict[str, Any] | None) -> dict[str, Any]:
        cfg, role = self.config, self.config.for_role(slot.role)
        spec = WorkspaceSpec(name=slot.name, role=slot.role, path=str(slot.workspace),
                             channels=list(cfg.agentchat_channels), repo=cfg.repo,
                             instructions=role.instructions, swarm_id=str(self.paths.root))
        return {"t": "boot", "workspace": spec.__dict__, "server": self.relay_url,
                "channels": list(cfg.agentchat_channels),
                "send_interval": 1.0 / cfg.agentchat_rate_limit if cfg.agentchat_rate_limit else 0.0,
                "heartbeat_interval": cfg.heartbeat_interval, "status_interval": cfg.status_interval,
                "max_task_duration": role.max_task_duration, "shutdown_grace": cfg.shutdown_grace,
                "agent_command": list(role.command), "agent_env": dict(role.env),
                "coordinator_id": self.coordinator.agent_id if cfg.coordinator == "builtin" else "",
                "cgroup": cgroup, "sandbox": self.isolation.sandbox_spec(slot.name, slot.role)
                if self.isolation else None,
                "grants": self.isolation.env_grants(slot.name, slot.role) if self.isolation else []}

    async def respawn(self, name: str) -> None:
        slot = self.slots.get(name)
        if slot is not None and slot.status is SlotStatus.BACKOFF and not self.stopping:
            await self.spawn_daemon(slot)

    def retire(self, slot: Slot) -> None:
        """Stop a daemon for good (scale down): SIGTERM, then SIGKILL if it lingers."""
        slot.retiring = True
        for timer in slot.timers:
            timer.cancel()
        if slot.pid is None:
            self._forget(slot)
            return
        slot.status = SlotStatus.STOPPING
        log.info("retiring %s", slot.name, extra=slot.fields(event="scale-down"))
        self.terminate(slot)

    def terminate(self, slot: Slot, grace: float = KILL_AFTER_TERM_S) -> None:
        pid = slot.pid
        if pid is None:
            return
        _kill(pid, signal.SIGTERM)
        self._later(grace, lambda: slot.pid == pid and _kill(pid, signal.SIGKILL))

    def murder_daemons(self) -> None:
        """Replace daemons that missed too many heartbeats (hung, stopped)."""
        for name in self.health.overdue(time.monotonic()):
            slot = self.slots.get(name)
            if slot is None or slot.pid is None or slot.retiring:
                continue
            log.error("%s missed %d heartbeats; killing it", name, self.config.heartbeat_misses,
                      extra=slot.fields(event="heartbeat-dead"))
            slot.last_exit = "heartbeat lost"
            _kill(slot.pid, signal.SIGKILL)  # a stopped process never sees SIGTERM

    def _on_daemon_exit(self, slot: Slot, pid: int, info: proc.ExitInfo) -> None:
        if slot.pid != pid:
            return
        self.spawner.gate.leave(slot.name)
        reason = self._exit_reason(slot, info)
        slot.pid, slot.connected = None, False
        if slot.channel is not None:
            slot.channel.close()
            slot.channel = None
        self._kill_leftovers(slot)
        self.coordinator.agent_gone(slot.name, reason)
        slot.task_id = slot.session_pid = slot.task_started = None
        if slot.retiring or self.stopping:
            log.info("%s (pid %d) stopped (%s)", slot.name, pid, reason, extra=slot.fields(event="exit"))
            if slot.retiring:
                self._forget(slot)
            return
        log.warning("%s (pid %d) exited: %s", slot.name, pid, reason,
                    extra=slot.fields(event="crash", reason=reason))
        self._crashed(slot, reason)

    def _exit_reason(self, slot: Slot, info: proc.ExitInfo) -> str:
        if slot.last_exit == "heartbeat lost":
            return slot.last_exit
        if info.signal == signal.SIGKILL and self.cgroups is not None and \
                self.config.for_role(slot.role).memory_limit:
            kills = self.cgroups.group(slot.name).oom_kills()
            if kills > slot.oom_seen:
                slot.oom_seen = kills
                return "oom"
        return info.reason

    def _kill_leftovers(self, slot: Slot) -> None:
        """No orphans: the session tree of a dead daemon goes with it."""
        if slot.session_pid:
            try:
                os.killpg(slot.session_pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.cgroups is not None and self.config.for_role(slot.role).memory_limit:
            self.cgroups.group(slot.name).kill_all(signal.SIGKILL)

    def _crashed(self, slot: Slot, reason: str) -> None:
        slot.last_exit = reason
        self.health.forget(slot.name)
        decision = slot.restarts.on_exit(time.monotonic())
        self.save_restarts()
        if isinstance(decision, GiveUp) or reason.startswith("boot failed"):
            slot.status = SlotStatus.DEGRADED
            slot.degraded_reason = reason if reason.startswith("boot failed") else decision.reason  # type: ignore[union-attr]
            log.error("%s is degraded: %s; not restarting", slot.name, slot.degraded_reason,
                      extra=slot.fields(event="degraded"))
            return
        slot.status = SlotStatus.BACKOFF
        log.info("restarting %s in %.0fs (restart %d)", slot.name, decision.delay, decision.attempt,
                 extra=slot.fields(event="backoff"))
        self._later(decision.delay, lambda: self.queue.put_nowait(("respawn", slot.name)), slot)

    def _forget(self, slot: Slot) -> None:
        self.slots.pop(slot.name, None)
        self.health.forget(slot.name)
        if self.cgroups is not None:
            self.cgroups.remove(slot.name)
        if not self.config.persist:
            # rmtree of a cloned repository can take seconds: not in the loop.
            assert self._loop is not None
            future = self._loop.run_in_executor(None, teardown, slot.workspace, True)
            self.teardowns.add(future)
            future.add_done_callback(self._teardown_done)

    def sweep_workspaces(self) -> None:
        """No leak even after a crash: with persist false, remove at start the workspaces
        this swarm created that no slot owns (e.g. an agent retired just before a kill -9)."""
        if self.config.persist:
            return
        assert self._loop is not None
        for root in swarm_workspaces(self.config.workspace_base, str(self.paths.root)):
            if root.name in self.slots:
                continue
            log.info("removing workspace %s left by an earlier run", root, extra=log_fields(event="teardown"))
            future = self._loop.run_in_executor(None, teardown, root, True)
            self.teardowns.add(future)
            future.add_done_callback(self._teardown_done)

    def _teardown_done(self, future: "asyncio.Future[bool]") -> None:
        self.teardowns.discard(future)
        if future.exception() is not None:
            log.error("workspace teardown failed: %s", future.exception(), extra=log_fields(event="teardown"))

    def _later(self, delay: float, fn: Callable[[], Any], slot: Slot | None = None) -> None:
        assert self._loop is not None
        handle = self._loop.call_later(delay, fn)
        if slot is not None:
            slot.timers = [t for t in slot.timers if not t.cancelled()] + [handle]

    # ------------------------------------------------------- IPC from daemons
    def _on_ipc(self, slot: Slot, msg: dict[str, Any]) -> None:
        try:
            ipc.check_from_daemon(msg)
            handler = getattr(self, f"_ipc_{msg['t']}")
            handler(slot, msg)
        except ipc.IpcError as exc:
            log.warning("dropped IPC message from %s: %s", slot.name, exc, extra=slot.fields(event="ipc"))
        except Exception:  # noqa: BLE001 - a daemon is untrusted: nothing it sends reaches the loop
            log.exception("IPC message %r from %s failed", msg.get("t"), slot.name,
                          extra=slot.fields(event="ipc"))

    def _ipc_hello(self, slot: Slot, msg: dict[str, Any]) -> None:
        pass

    def _ipc_ready(self, slot: Slot, msg: dict[str, Any]) -> None:
        self.spawner.gate.leave(slot.name)
        if "boot_ms" in msg and slot.spawn_began:  # ipc.check_from_daemon: a dict
            self._log_boot(slot, msg["boot_ms"])
        slot.agent_id, slot.lurk, slot.link_problem = msg["agent_id"][:64], msg.get("lurk", False), ""
        slot.confined = msg.get("confined", "none")[:32]
        if slot.lurk:
            log.warning("%s is in its lurk period on %s", slot.name, self.relay_url,
                        extra=slot.fields(event="lurk"))

    def _log_boot(self, slot: Slot, phases: dict[str, Any]) -> None:
        """One line per start: where its time went (slow starts are diagnosed from these)."""
        total = round((time.monotonic() - slot.spawn_began) * 1000)
        parts = {"spawn": round((slot.started_at - slot.spawn_began) * 1000)}
        parts.update((k, round(v)) for k, v in phases.items()
                     if k in ipc.BOOT_PHASES and isinstance(v, (int, float)))
        # the boot message's way to the daemon, fork to daemon code, the "ready" IPC
        parts["other"] = max(0, total - sum(parts.values()))
        slot.spawn_began = 0.0
        log.info("%s ready in %d ms (pid %s, %s; %s)", slot.name, total, slot.pid, slot.spawned_via,
                 ", ".join(f"{k} {v}" for k, v in parts.items()),
                 extra=slot.fields(event="boot", boot_ms=total, phases_ms=parts))

    def _ipc_heartbeat(self, slot: Slot, msg: dict[str, Any]) -> None:
        self.health.beat(slot.name, time.monotonic())
        slot.connected = msg["connected"]
        status = msg["status"]
        if status in ("promoting", "active", "demoting"):
            slot.status = SlotStatus(status)
        elif status == "idle" and slot.status in BUSY | {SlotStatus.STARTING}:
            slot.status, slot.idle_since = SlotStatus.IDLE, time.monotonic()
            self.coordinator.pump()  # a daemon is free: announce what waits

    def _ipc_link(self, slot: Slot, msg: dict[str, Any]) -> None:
        event, detail = msg["event"], msg.get("detail", {})
        if event in ("reconnect_failed", "send_refused", "error"):
            slot.link_problem = f"{event}: {detail}"[:200]
            log.warning("%s: agentchat %s %s", slot.name, event, detail, extra=slot.fields(event=event))
        elif event == "disconnected":
            slot.connected = False

    def _ipc_log(self, slot: Slot, msg: dict[str, Any]) -> None:
        level = logging.getLevelName(msg["level"].upper())
        level = level if isinstance(level, int) else logging.INFO
        extra = log_fields(agent=slot.name, role=slot.role, task=msg.get("task") or slot.task_id,
                           event=msg.get("event") or "daemon")
        logging.getLogger("agentctl_swarm.agent").log(level, "%s", msg["msg"], extra=extra)

    def _ipc_fatal(self, slot: Slot, msg: dict[str, Any]) -> None:
        slot.last_exit = msg["reason"][:300]
        log.error("%s: %s", slot.name, slot.last_exit, extra=slot.fields(event="fatal"))

    def _ipc_promote(self, slot: Slot, msg: dict[str, Any]) -> None:
        self.coordinator.promote_requested(slot, msg["task_id"])

    def _ipc_session_started(self, slot: Slot, msg: dict[str, Any]) -> None:
        self.coordinator.session_started(slot, msg["task_id"], msg["pid"])

    def _ipc_session_ended(self, slot: Slot, msg: dict[str, Any]) -> None:
        self.coordinator.session_ended(slot, msg)

    def _ipc_interrupted(self, slot: Slot, msg: dict[str, Any]) -> None:
        self.coordinator.task_interrupted(msg["task_id"], slot.name, "daemon restarted")

    # ------------------------------------------------------- reload, status, stop
    def reload(self) -> dict[str, Any]:
        """SIGHUP: re-read the config; a broken file keeps the old one running."""
        self.notifier.reloading()
        try:
            # The file the swarm runs on: if it vanished, that is an error, not "use defaults".
            new = load_config(self.config.source or self.config_arg)
        except ConfigError as exc:
            log.error("config reload failed, keeping the old config: %s", exc,
                      extra=log_fields(event="reload-failed"))
            self.notifier.ready(self.status_line())
            return {"ok": False, "error": str(exc)}
        changes = diff_configs(self.config, new)
        old, self.config = self.config, new
        self.apply_reload(old, new)
        summary = ", ".join(changes) if changes else "no changes"
        log.info("config reloaded: %s", summary, extra=log_fields(event="reload"))
        self.notifier.ready(self.status_line())
        return {"ok": True, "changes": changes}

    def apply_reload(self, old: SwarmConfig, new: SwarmConfig) -> None:
        self.health.configure(new.heartbeat_interval, new.heartbeat_misses)
        if (old.heartbeat_interval, old.status_interval) != (new.heartbeat_interval, new.status_interval):
            for slot in self.slots.values():
                if slot.channel is not None:
                    slot.channel.send({"t": "set", "heartbeat_interval": new.heartbeat_interval,
                                       "status_interval": new.status_interval})
        if new.count != old.count and self.count_override is None:
            self.set_desired(new.count)
        self.coordinator.config_changed(old, new)

    def set_desired(self, count: int) -> None:
        self.desired = count
        write_json_atomic(self.paths.state_file("desired"),
                          {"count": count, "config_count": self.config.count})

    def _load_desired(self) -> None:
        if self.count_override is not None:
            self.desired = self.count_override
            return
        saved, problem = read_json(self.paths.state_file("desired"), {})
        if problem:
            log.warning("%s", problem, extra=log_fields(event="state"))
        if isinstance(saved, dict) and saved.get("config_count") == self.config.count \
                and isinstance(saved.get("count"), int) and 0 <= saved["count"] <= 10000:
            self.desired = saved["count"]
        else:
            self.desired = self.config.count

    def status_line(self) -> str:
        active = sum(1 for s in self.slots.values() if s.status in BUSY)
        return f"{len(self.slots)} daemons, {active} active, {self.coordinator.budget_line()}"

    def notify_progress(self) -> None:
        """READY once the initial daemons heartbeat; STATUS when it changes; WATCHDOG."""
        self.notifier.watchdog()
        if not self.ready_sent:
            self._maybe_ready()
        line = self.status_line()
        if line != self._last_status:
            self._last_status = line
            self.notifier.status(line)
        now = time.monotonic()
        if now - self._last_sample >= self.config.health_sample_interval:
            self._last_sample = now
            self.health.sample({s.name: s.pid for s in self.slots.values() if s.pid})

    def _maybe_ready(self) -> None:
        up = [n for n in self.initial if n in self.slots and self.slots[n].connected]
        timed_out = time.time() - self.started > self.config.start_timeout
        if len(up) < len(self.initial) and not timed_out:
            return
        self.ready_sent = True
        status = self.status_line()
        if len(up) < len(self.initial):
            status = f"{status}; only {len(up)}/{len(self.initial)} daemons came up in time"
            log.warning("%s", status, extra=log_fields(event="ready"))
        self.notifier.ready(status)
        log.info("swarm ready: %s", status, extra=log_fields(event="ready"))

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        agents = []
        for slot in sorted(self.slots.values(), key=lambda s: s.name):
            age = self.health.age(slot.name, now)
            rss = self.health.rss(slot.name)
            agents.append({
                "name": slot.name, "role": slot.role, "pid": slot.pid, "status": slot.status.value,
                "restarts": slot.restarts.restart_count,
                "last_heartbeat_age_s": None if age is None else round(age, 1),
                "workspace": str(slot.workspace),
                "rss_mb": None if rss is None else round(rss / 2**20, 1),
                "task": slot.task_id,
                "task_elapsed_s": None if slot.task_started is None else round(now - slot.task_started, 1),
                "connected": slot.connected, "lurk": slot.lurk, "last_exit": slot.last_exit,
                "degraded_reason": slot.degraded_reason, "link_problem": slot.link_problem,
                "spawned_via": slot.spawned_via, "daemon_confinement": slot.confined,
                "memory_usage_mb": self._cgroup_usage(slot),
            })
        return {"supervisor": {
            "pid": self.pid, "uptime_s": round(time.time() - self.started, 1),
            "config_path": str(self.config.source) if self.config.source else None,
            "agentchat_server": self.relay_url, "paused": self.coordinator.paused_reason(),
            "desired": self.desired, "max_active": self.config.max_active,
            "budget": self.coordinator.budget_dict(), "spawn": self.config.spawn,
            "memory_enforcement": self.cgroups.enforcement.value if self.cgroups else "none",
            "memory_enforcement_detail": self.cgroups.description if self.cgroups else "",
            "sandbox": self.isolation.description if self.isolation else "none",
            "ready": self.ready_sent, "relay_pid": self.relay_pid,
            "forkserver_pid": self.spawner.forkserver.pid if self.spawner.forkserver else None,
            "forkserver_ready": bool(self.spawner.forkserver and self.spawner.forkserver.alive),
            "merge_pages": {"configured": self.config.merge_pages, "ksm_running": proc.ksm_running()},
        }, "agents": agents}

    def _cgroup_usage(self, slot: Slot) -> float | None:
        if self.cgroups is None or not self.config.for_role(slot.role).memory_limit or slot.pid is None:
            return None
        used = self.cgroups.group(slot.name).memory_current()
        return None if used is None else round(used / 2**20, 1)

    def is_agent_process(self, pid: int) -> bool:
        """Is ``pid`` a daemon, a session or anything they started? (control-socket check)"""
        daemons = {s.pid for s in self.slots.values() if s.pid}
        sessions = {s.session_pid for s in self.slots.values() if s.session_pid}
        try:
            if os.getsid(pid) in daemons | sessions:
                return True
        except OSError:
            return False
        if daemons & set(proc.ancestors(pid)):
            return True
        return self.cgroups is not None and self.cgroups.contains_process(pid)

    def request_stop(self) -> None:
        self.stopping = True
        self.queue.put_nowait(("tick", None))

    async def shutdown(self) -> None:
        """SIGTERM every child, wait up to the grace period, SIGKILL survivors, clean up."""
        self.stopping = True
        self.notifier.stopping()
        if self._forkserver_start is not None:
            self._forkserver_start.cancel()  # still waiting for a preload; _stop_helpers ends it
        log.info("shutting down %d daemons", len(self.slots), extra=log_fields(event="stopping"))
        await self.coordinator.stop()
        for slot in self.slots.values():
            for timer in slot.timers:
                timer.cancel()
            if slot.pid is not None:
                _kill(slot.pid, signal.SIGTERM)
        await self._wait_for_daemons(self.config.shutdown_grace + 1.0)
        for slot in self.slots.values():
            if slot.pid is not None:
                log.warning("%s did not stop in time; killing it", slot.name, extra=slot.fields(event="kill"))
                _kill(slot.pid, signal.SIGKILL)
                self._kill_leftovers(slot)
        await self._wait_for_daemons(5.0)
        await self._stop_helpers()
        for slot in list(self.slots.values()):
            self._forget(slot)
        if self.teardowns:
            await asyncio.wait(list(self.teardowns), timeout=60)
        if self.cgroups is not None:
            try:
                self.cgroups.remove_base()
            except OSError as exc:
                log.warning("cgroup base not removed: %s", exc, extra=log_fields(event="cgroup"))
        if self.control is not None:
            await self.control.stop()
        if self.reaper is not None:
            self.reaper.close()
        if self.isolation is not None:
            self.isolation.rule_paths.close()
        log.info("swarm stopped", extra=log_fields(event="stopped"))

    async def _wait_for_daemons(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while any(s.pid is not None for s in self.slots.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def _stop_helpers(self) -> None:
        """The relay and the fork-server: TERM, wait briefly, KILL."""
        self.spawner.close()
        pids = [p for p in (self.relay_pid, self.spawner.forkserver.pid if self.spawner.forkserver else None)
                if p]
        for pid in pids:
            _kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 3.0
        while self.relay_pid and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for pid in pids:
            _kill(pid, signal.SIGKILL)
        await asyncio.sleep(0)


def _kill(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


async def _wait_for_port(port: int, timeout: float) -> None:
    """Wait until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise asyncio.TimeoutError(f"relay did not listen on port {port}") from None
            await asyncio.sleep(0.02)


def run_supervisor(config: SwarmConfig, *, paths: SwarmPaths, config_arg: Path | None,
                   count_override: int | None, pidfile: PidFile | None = None,
                   forkserver: ForkServerClient | None = None) -> int:
    """Lock, log, run the loop; the pidfile lock is held for the whole life.

    ``pidfile`` (already acquired) and ``forkserver`` (already exec'd) come from a
    caller that started them before importing this module: see ``cli.cmd_swarm_start``."""
    from .system.journal import setup_logging
    if pidfile is None:
        paths.ensure()
        pidfile = PidFile(paths.pidfile)
        pidfile.acquire()
    try:
        setup_logging(log_dir=paths.log_dir)
        supervisor = Supervisor(config, paths=paths, config_arg=config_arg, count_override=count_override,
                                forkserver=forkserver)
        supervisor.pidfile = pidfile
        return asyncio.run(supervisor.run())
    finally:
        pidfile.release()
