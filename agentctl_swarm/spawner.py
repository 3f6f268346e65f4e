"""The spawn moment: how a daemon or an agent session comes into being.

Design note
-----------
Every process the swarm starts goes through ``apply_in_child(plan)``, run in the
child after ``fork()`` and before any daemon code or ``exec``. It is the one place
where a child is detached, tied to the supervisor's life, put in its cgroup,
confined, and stripped of descriptors it must not hold. Three paths use it:

* **fork-server** (default for daemons): the supervisor sends the plan to the
  zygote (``forkserver.py``), which forks it with ``CLONE_PARENT``, so the daemon
  is born the supervisor's child. (The fallback double fork has an intermediate
  that exits at once, so the daemon is reparented to the supervisor, a child
  subreaper (``PR_SET_CHILD_SUBREAPER``); the daemon waits for that.) It then sets
  ``PR_SET_PDEATHSIG`` (which is relative to the *current* parent) and
  re-checks its parent, so it can never outlive the supervisor.
* **exec** (``spawn: exec``): the supervisor forks and the child execs
  ``python -m agentctl_swarm.daemon``. Slower (a fresh interpreter and imports per
  daemon), kept for comparison and as the fallback when the fork-server is down.
* **session**: the daemon starts ``agent.command`` with ``apply_in_child`` as the
  ``preexec_fn`` of ``asyncio.create_subprocess_exec``; the session gets its own
  process group so the whole tree can be killed.

Either way the supervisor learns the daemon's PID at once and watches it with a
pidfd (``reaper.py``); nobody calls ``waitpid(-1)``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from .system import proc

if TYPE_CHECKING:
    from .system import sandbox

log = logging.getLogger(__name__)

EXIT_ORPHANED = 75  # the supervisor died before the child could tie itself to it
EXIT_SETUP_FAILED = 76  # cgroup, sandbox or descriptor setup failed in the child
FORKSERVER_TIMEOUT = 5.0
FORKSERVER_IN_FLIGHT = 16  # requests on the socket at once: a burst never fills its buffer
BOOTS_PER_CPU = 4       # daemons between fork and "ready" at once, per CPU
FORKSERVER_READY_TIMEOUT = 30.0  # from exec to "preloaded"; normally ~0.3 s
FORKSERVER_WORTH_WAITING = 2.0  # from its attach: starts wait this long for a preload, then exec
BOOT_GATE_TIMEOUT = 3.0  # a daemon slower than this to boot (a git clone) stops holding a place


@dataclass
class LaunchPlan:
    """Everything a child needs to set itself up; JSON-serialisable for the fork-server."""

    name: str
    keep_fds: tuple[int, ...] = ()
    supervisor_pid: int | None = None  # expected parent; None: do not tie to a parent
    reparenting: bool = False  # our parent is an intermediate about to exit (double fork)
    pdeathsig: int = int(signal.SIGKILL)
    new_session: bool = True
    cgroup: dict[str, Any] | None = None  # system.cgroups join spec
    sandbox: dict[str, Any] | None = None  # {"kind": "landlock", "policy": {...}}
    cwd: str | None = None
    env: dict[str, str] | None = None
    merge_pages: bool | None = None  # KSM for this child and what it execs; None: as the parent
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        # Every field is JSON already (dicts, lists, str, int): asdict's deep copy
        # of them cost ~70 us a start in the supervisor, ~8 without it.
        return json.dumps(vars(self))

    @classmethod
    def from_json(cls, text: str | bytes | bytearray) -> "LaunchPlan":
        data = json.loads(text)
        data["keep_fds"] = tuple(data.get("keep_fds", ()))
        return cls(**data)


class SpawnError(Exception):
    """A child could not be started."""


def apply_in_child(plan: LaunchPlan) -> None:
    """Run in the child between fork and daemon code or exec. Never returns on failure."""
    try:
        _reset_signals()
        if plan.new_session:
            os.setsid()
        if plan.supervisor_pid is not None:
            tie_to_parent(plan.supervisor_pid, plan.pdeathsig, plan.reparenting)
        if plan.cgroup is not None:
            from .system import cgroups
            cgroups.join_spec(plan.cgroup)
        if plan.merge_pages is not None:
            proc.set_memory_merge(plan.merge_pages)  # best effort: no KSM, no merging
        if plan.sandbox is not None:
            from .isolation import apply_sandbox_spec
            apply_sandbox_spec(plan.sandbox)
        proc.close_fds(set(plan.keep_fds) | {0, 1, 2})
        if plan.cwd is not None:
            os.chdir(plan.cwd)
    except BaseException as exc:  # noqa: BLE001 - the child must not return into the parent's code
        child_fail(plan.name, exc)


def _reset_signals() -> None:
    """Drop the parent's Python-level signal plumbing (its wakeup fd belongs to the parent)."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1):
        proc.set_signal(sig, signal.SIG_DFL)


def tie_to_parent(supervisor_pid: int, sig: int, reparenting: bool) -> None:
    """Wait for reparenting to the supervisor if need be, then die with it."""
    parent = os.getppid()
    if parent != supervisor_pid and reparenting:
        # Double-forked: our parent is the fork-server's intermediate, which exits
        # right away. Wait on its pidfd (no spinning), then we belong to the subreaper.
        try:
            fd = os.pidfd_open(parent)
        except ProcessLookupError:
            fd = -1
        if fd >= 0:
            import select
            select.select([fd], [], [], FORKSERVER_TIMEOUT)
            os.close(fd)
    proc.set_pdeathsig(sig)
    if os.getppid() != supervisor_pid:
        os._exit(EXIT_ORPHANED)


def child_fail(name: str, exc: BaseException) -> NoReturn:
    """In a child whose set-up failed: say why on stderr, exit EXIT_SETUP_FAILED."""
    try:
        os.write(2, f"agentctl-swarm: {name}: child setup failed: {exc}\n".encode())
    finally:
        os._exit(EXIT_SETUP_FAILED)


RELAY_OPEN_TIMEOUT = 1.0  # s to open a daemon's first relay connection for it


async def handed_fds(boot: dict[str, Any], workspaces: Path,
                     rule_paths: sandbox.PathHandles | None = None) -> dict[str, int]:
    """What a daemon is handed besides its IPC socket, by role (``spawn_daemon``'s
    ``pass_fds``), made by the caller, where the code is warm: in each daemon they were
    first touches (~0.4 MB of copied pages together). The caller closes them.

    - ``"ruleset"`` and ``"shared"``: its Landlock rulesets, its own layer without its
      workspace and the layer all daemons share (``isolation.daemon_rulesets``, with the
      caller's ``rule_paths``; without them one whole ruleset); the daemon completes its
      own and enters both.
    - ``"relay"``: its first relay connection, opened up to the WebSocket upgrade
      (``_ws.open_upgraded``; ``boot`` gets the ``relay_handover`` that goes with it);
      the daemon identifies and joins on it. Not for ``wss://`` (the TLS state cannot
      be handed over), nor for a workspace that is cloned first (a server may drop a
      connection silent that long).

    What cannot be made is left out, and the daemon does it itself (and says why if it
    cannot either)."""
    from .agentchat import _ws
    from .isolation import daemon_rulesets
    from .system import sandbox
    handed: dict[str, int] = {}
    name = boot["workspace"]["name"]
    try:
        handed.update(daemon_rulesets(boot["sandbox"], workspaces, boot["grants"], rule_paths))
    except (sandbox.SandboxError, OSError) as exc:
        log.debug("no ruleset for %s: %s", name, exc)
    if boot["workspace"].get("repo") or not boot["server"].startswith("ws://"):
        return handed
    try:
        sock, uri, received = await _ws.open_upgraded(boot["server"], timeout=RELAY_OPEN_TIMEOUT)
    except (OSError, ValueError, TimeoutError) as exc:
        log.debug("no relay connection for %s: %r", name, exc)
        return handed
    boot["relay_handover"] = {"uri": uri, "received": received.hex()}
    handed["relay"] = sock.detach()
    return handed


def daemon_argv(ipc_fd: int, pass_fds: dict[str, int] | None = None) -> list[str]:
    argv = [sys.executable, "-m", "agentctl_swarm.daemon", "--ipc-fd", str(ipc_fd)]
    for role, fd in (pass_fds or {}).items():
        argv += [f"--{role}-fd", str(fd)]
    return argv


def fork_exec(plan: LaunchPlan, argv: list[str]) -> int:
    """The exec path: fork, set up, exec ``argv``. Returns the child's PID."""
    pid = os.fork()
    if pid == 0:
        apply_in_child(plan)
        try:
            for fd in plan.keep_fds:
                os.set_inheritable(fd, True)
            os.execve(argv[0], argv, plan.env if plan.env is not None else os.environ)
        except BaseException as exc:  # noqa: BLE001
            child_fail(plan.name, exc)
    return pid


class ForkServerClient:
    """The supervisor's end of the fork-server: start it, ask it for daemons."""

    def __init__(self, supervisor_pid: int) -> None:
        self.supervisor_pid = supervisor_pid
        self.pid: int | None = None
        self._sock: socket.socket | None = None
        self._next_id = 0
        self._pending: dict[int, asyncio.Future[int]] = {}
        self._ready: asyncio.Future[None] | None = None
        self._wait_until = 0.0  # loop time; see settled
        self._said_late = False  # settled's warning, once per start of the fork-server
        self._slots = asyncio.Semaphore(FORKSERVER_IN_FLIGHT)

    @classmethod
    def adopt(cls, pid: int, sock: socket.socket) -> "ForkServerClient":
        """The client for a fork-server this process forked itself (``forkserver.prestart``)
        before it had an event loop; the supervisor attaches it to its loop
        (``Supervisor.start_forkserver``). Should the supervisor never get that far, the
        fork-server dies with it (PDEATHSIG) or exits on the closed socket."""
        client = cls(os.getpid())
        client.pid, client._sock = pid, sock
        return client

    @property
    def alive(self) -> bool:
        return self._sock is not None and self._ready is not None and self._ready.done() \
            and not self._ready.exception()

    def launch(self, plan: LaunchPlan, *, double_fork: bool = False) -> int:
        """Exec the fork-server; its PID at once (``wait_ready`` for the preload).
        ``double_fork`` forces its fallback path (for tests)."""
        pid = self.start(plan, double_fork=double_fork)
        self.attach()
        return pid

    def start(self, plan: LaunchPlan, *, double_fork: bool = False) -> int:
        """Exec the fork-server without an event loop, so that a starting supervisor can
        do it before its own imports (``attach`` once the loop runs)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            ours.setblocking(False)
            plan.keep_fds = (theirs.fileno(),)
            argv = [sys.executable, "-m", "agentctl_swarm.forkserver", "--fd", str(theirs.fileno())]
            argv += ["--double-fork"] if double_fork else []
            self.pid = fork_exec(plan, argv)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock, self._ready = ours, None
        return self.pid

    @property
    def attached(self) -> bool:
        return self._ready is not None

    def attach(self) -> None:
        """Watch the started fork-server's socket from the running loop."""
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._wait_until = loop.time() + FORKSERVER_WORTH_WAITING
        self._said_late = False
        loop.add_reader(self._sock.fileno(), self._on_readable)

    async def wait_ready(self, timeout: float = FORKSERVER_READY_TIMEOUT) -> None:
        """Until it has preloaded; SpawnError if it died first, TimeoutError if too slow."""
        assert self._ready is not None
        await asyncio.wait_for(asyncio.shield(self._ready), timeout)

    async def settled(self) -> None:
        """Until a fork-server that is preloading is ready or has failed, but never past
        FORKSERVER_WORTH_WAITING from its attach: one deadline for every start, so a
        fork-server stuck in its preload costs the swarm two seconds, not two per
        daemon. Returns at once if it is not preloading; never raises."""
        if self._ready is None or self._ready.done():
            return
        remaining = self._wait_until - asyncio.get_running_loop().time()
        if remaining > 0:
            await asyncio.wait([self._ready], timeout=remaining)  # which never cancels it
        if not self._ready.done() and not self._said_late:
            self._said_late = True
            log.warning("fork-server %s not ready after %.0f s; daemons are exec'd until it is",
                        self.pid, FORKSERVER_WORTH_WAITING)

    def _on_readable(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(4096)
            except BlockingIOError:
                return
            except OSError as exc:
                self._lost(f"fork-server socket error: {exc}")
                return
            if not data:
                self._lost("fork-server closed its socket")
                return
            self._dispatch(json.loads(data))

    def _dispatch(self, msg: dict[str, Any]) -> None:
        if msg.get("ready"):
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
            return
        fut = self._pending.pop(msg.get("id", -1), None)
        if fut is None or fut.done():
            return
        if "pid" in msg:
            fut.set_result(int(msg["pid"]))
        else:
            fut.set_exception(SpawnError(str(msg.get("error", "fork-server failed"))))

    def _lost(self, why: str) -> None:
        """The fork-server is gone: fail whatever waits on it, so no start hangs."""
        self.close()
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(SpawnError(why))
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(SpawnError(why))
        self._pending.clear()

    async def spawn(self, plan: LaunchPlan, pass_fds: list[int]) -> int:
        """Ask for one daemon; ``pass_fds`` become its IPC descriptor and the others that
        ``plan.extra["fds"]`` names (``forkserver._run_daemon``).

        At most FORKSERVER_IN_FLIGHT requests are outstanding, and the timeout
        counts from the send, so a burst of 400 starts queues here instead of
        failing with EAGAIN or timing out while still waiting in line.
        """
        async with self._slots:
            return await self._spawn(plan, pass_fds)

    async def _spawn(self, plan: LaunchPlan, pass_fds: list[int]) -> int:
        if not self.alive or self._sock is None:
            raise SpawnError("fork-server is not running")
        self._next_id += 1
        req_id = self._next_id
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = fut
        body = b"%d\n" % req_id + plan.to_json().encode()  # the fork-server reads only the id
        try:
            socket.send_fds(self._sock, [body], pass_fds)
        except OSError as exc:
            self._pending.pop(req_id, None)
            raise SpawnError(f"fork-server unreachable: {exc}") from None
        try:
            return await asyncio.wait_for(fut, FORKSERVER_TIMEOUT)
        except asyncio.TimeoutError:
            self._pending.pop(req_id, None)
            raise SpawnError("fork-server did not answer in time") from None

    def close(self) -> None:
        if self._sock is not None:
            try:
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            except RuntimeError:
                pass
            self._sock.close()
            self._sock = None


def forkserver_plan(supervisor_pid: int, cgroup: dict[str, Any] | None = None) -> LaunchPlan:
    return LaunchPlan(name="fork-server", supervisor_pid=supervisor_pid, cgroup=cgroup)


class BootGate:
    """At most ``limit`` daemons booting (between spawn and "ready") at once.

    Measured on 2 cores: 100 daemons forked at once spend 20-40 ms of CPU each on
    a 6 ms boot, because they thrash the caches and starve the fork-server and the
    relay that every one of them waits on. Admitting a few per CPU at a time keeps
    each boot short and the helpers responsive, so the whole swarm is ready
    sooner. A place is given back on "ready", on exit, on a failed spawn, or after
    ``timeout`` (a daemon cloning a repository must not hold up the rest).
    """

    def __init__(self, limit: int, timeout: float = BOOT_GATE_TIMEOUT) -> None:
        self.limit, self.timeout = limit, timeout
        self._sem = asyncio.Semaphore(limit)
        self._held: dict[str, asyncio.TimerHandle] = {}

    @property
    def booting(self) -> int:
        return len(self._held)

    async def enter(self, name: str) -> None:
        self.leave(name)  # a restart of the same slot never holds two places
        await self._sem.acquire()
        self._held[name] = asyncio.get_running_loop().call_later(self.timeout, self.leave, name)

    def leave(self, name: str) -> None:
        """Give back ``name``'s place (idempotent)."""
        timer = self._held.pop(name, None)
        if timer is not None:
            timer.cancel()
            self._sem.release()


class Spawner:
    """Starts daemons by the configured path, falling back to exec when the zygote is down."""

    def __init__(self, mode: str, supervisor_pid: int, forkserver: ForkServerClient | None = None) -> None:
        self.mode = mode
        self.supervisor_pid = supervisor_pid
        if mode == "fork-server":
            self.forkserver = forkserver or ForkServerClient(supervisor_pid)
        else:
            self.forkserver = None
        self.gate = BootGate(BOOTS_PER_CPU * (os.cpu_count() or 1))

    def launch_forkserver(self, cgroup: dict[str, Any] | None = None) -> int:
        assert self.forkserver is not None
        return self.forkserver.launch(forkserver_plan(self.supervisor_pid, cgroup))

    async def spawn_daemon(self, plan: LaunchPlan,
                           pass_fds: dict[str, int] | None = None) -> tuple[int, socket.socket, str]:
        """Start one daemon. Returns (pid, the supervisor's IPC socket, the path used).

        ``pass_fds``: descriptors the daemon gets besides its IPC socket, by role
        (``"ruleset"``: its Landlock ruleset; ``"relay"``: its first relay
        connection); the caller keeps (and closes) its own."""
        plan.supervisor_pid = self.supervisor_pid
        pass_fds = pass_fds or {}
        plan.extra["fds"] = list(pass_fds)
        fs = self.forkserver
        if fs is not None:
            # The swarm's first daemons are prepared while the fork-server preloads
            # (Supervisor.boot): a fork in a few hundred ms is cheaper than an exec now.
            await fs.settled()
        if fs is not None and fs.alive:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                pid = await fs.spawn(plan, [theirs.fileno(), *pass_fds.values()])
                return pid, ours, "fork-server"
            except SpawnError as exc:
                # A late answer may still start a daemon on this socketpair: closing our
                # end makes that one exit at once, and the exec'd one gets a fresh pair.
                ours.close()
                log.warning("fork-server could not start %s (%s); using exec", plan.name, exc)
            except BaseException:
                ours.close()
                raise
            finally:
                theirs.close()
        return self._exec_daemon(plan, pass_fds)

    def _exec_daemon(self, plan: LaunchPlan, pass_fds: dict[str, int]) -> tuple[int, socket.socket, str]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            plan.keep_fds = (theirs.fileno(), *pass_fds.values())
            return fork_exec(plan, daemon_argv(theirs.fileno(), pass_fds)), ours, "exec"
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()

    def close(self) -> None:
        if self.forkserver is not None:
            self.forkserver.close()
