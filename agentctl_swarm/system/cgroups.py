"""A memory-limited cgroup per daemon, on whichever mechanism this host offers.

Design note
-----------
Three ways to cap a daemon's memory, tried in this order by
:meth:`CgroupManager.detect`:

1. **cgroup v2, delegated subtree.**  Under systemd with ``Delegate=yes`` the
   service owns its cgroup (``0::/…/agentctl-swarm.service`` in
   /proc/self/cgroup).  It is usable when that directory is writable and lists
   ``memory`` in ``cgroup.controllers``.  v2's "no internal processes" rule
   forbids enabling controllers for children of a group that holds processes,
   so :meth:`CgroupManager.prepare_supervisor` first moves the supervisor (and
   anything else in the base) into a leaf ``<base>/supervisor``, then writes
   ``+memory +cpu`` to ``<base>/cgroup.subtree_control``.  Daemons go into
   ``<base>/<agent>`` with ``memory.max``, ``memory.swap.max=0`` and
   ``cpu.weight``.  On the hybrid layout the v2 tree is at
   /sys/fs/cgroup/unified and normally has no memory controller.
2. **cgroup v1 memory controller**, when its mount (found in
   /proc/self/mountinfo) is writable, which in practice means root.  Groups are
   created below our own v1 memory cgroup, ``<ours>/<name>/<agent>``, with
   ``memory.limit_in_bytes`` and ``memory.memsw.limit_in_bytes`` (so the limit
   cannot be dodged by swapping).  cgroupspy's MemoryController does the
   reading and writing when it is installed; a ten-line stand-in with the same
   attributes does it otherwise (Debian has no python3-cgroupspy).
3. **RLIMIT_AS**, set in the child.  It caps *virtual* address space, not
   resident memory, so it is coarse (thread stacks and arenas count) and it
   turns the overrun into MemoryError/ENOMEM instead of an OOM kill.  A warning
   says that this is what is in force, and why the cgroup paths are not.

``NONE`` is used when no limit is configured and no cgroup is available.

The join happens in the child, between fork and daemon code, possibly in a
separate fork-server process: :meth:`AgentCgroup.to_spec` gives a JSON-able
dict and :func:`join_spec` applies it with nothing but ``os.open``/``os.write``
(or one ``setrlimit``), which is safe right after fork.

Kernel facts relied on: a cgroup directory is removed with rmdir once it has no
live processes (zombies do not count); v1 ``memory.oom_control`` and v2
``memory.events`` count OOM kills in ``oom_kill`` (Linux 4.13+); v2
``cgroup.kill`` (5.14+) kills a whole group at once.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import resource
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agentctl_swarm.errors import SwarmError
from agentctl_swarm.system.proc import UNIFIED, process_cgroup

log = logging.getLogger(__name__)

SUPERVISOR_LEAF = "supervisor"
_REMOVE_TIMEOUT_S = 5.0


class CgroupError(SwarmError):
    """A cgroup could not be set up, joined or removed."""


class Enforcement(str, enum.Enum):
    CGROUP_V2 = "cgroup-v2"
    CGROUP_V1 = "cgroup-v1"
    RLIMIT = "rlimit"
    NONE = "none"


# --------------------------------------------------------------------------
# Finding the hierarchies


def _mounts() -> list[tuple[str, str, set[str]]]:
    """(mount point, fs type, super options) of every cgroup mount we can see."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fstype, _, opts = right.split(" ")[:3]
        if fstype in ("cgroup", "cgroup2"):
            found.append((left.split(" ")[4], fstype, set(opts.split(","))))
    return found


def _v2_mount() -> Path | None:
    return next((Path(p) for p, fs, _ in _mounts() if fs == "cgroup2"), None)


def _v1_memory_mount() -> Path | None:
    return next((Path(p) for p, fs, o in _mounts() if fs == "cgroup" and "memory" in o), None)


def _read(path: Path) -> str:
    return path.read_text().strip()


def _write(path: Path, value: str | int) -> None:
    """One write(2) of ``value``: cgroup files want the whole value in one call."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)


def _keyed(path: Path, key: str) -> int:
    """The integer after ``key`` in a flat-keyed file (memory.events, oom_control)."""
    for line in path.read_text().splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


def _v2_base(name: str) -> tuple[Path | None, str]:
    """Our delegated v2 cgroup, or None and the reason it is unusable."""
    mount = _v2_mount()
    if mount is None:
        return None, "no cgroup v2 hierarchy is mounted"
    own = process_cgroup("self").get(UNIFIED, "/")
    path = mount / own.lstrip("/")
    if path.name == SUPERVISOR_LEAF and "memory" in _controllers(path.parent, "subtree_control"):
        path = path.parent  # prepare_supervisor already ran in this process tree
    elif own == "/":
        path = mount / name  # the root group may hold processes; work one level down
    probe = path if path.is_dir() else path.parent
    available = _controllers(probe, "controllers")
    if "memory" not in available:
        shown = " ".join(sorted(available)) or "none"
        return None, f"cgroup v2 at {probe} has no memory controller (controllers: {shown})"
    if not os.access(probe, os.W_OK):
        return None, f"cgroup v2 at {probe} is not writable by uid {os.geteuid()} (no Delegate=yes?)"
    return path, ""


def _controllers(path: Path, kind: str) -> set[str]:
    try:
        return set(_read(path / f"cgroup.{kind}").split())
    except OSError:
        return set()


def _v1_base(name: str) -> tuple[Path | None, str]:
    """Where our v1 memory groups go, or None and the reason v1 is unusable."""
    mount = _v1_memory_mount()
    if mount is None:
        return None, "no cgroup v1 memory controller is mounted"
    own = mount / process_cgroup("self").get("memory", "/").lstrip("/")
    if not os.access(own, os.W_OK):
        return None, f"cgroup v1 memory at {own} is not writable by uid {os.geteuid()}"
    return own / name, ""


# --------------------------------------------------------------------------
# v1 file access: cgroupspy when installed, a stand-in otherwise


class _MemoryFiles(Protocol):
    limit_in_bytes: int
    memsw_limit_in_bytes: int
    swappiness: int
    usage_in_bytes: int


class _PlainMemoryController:
    """The few cgroupspy MemoryController attributes we use, as direct file I/O."""

    _files = {
        "limit_in_bytes": "memory.limit_in_bytes",
        "memsw_limit_in_bytes": "memory.memsw.limit_in_bytes",
        "swappiness": "memory.swappiness",
        "usage_in_bytes": "memory.usage_in_bytes",
    }

    def __init__(self, path: Path) -> None:
        object.__setattr__(self, "path", path)

    def __getattr__(self, attr: str) -> int:
        if attr not in self._files:
            raise AttributeError(attr)
        return int(_read(self.path / self._files[attr]))

    def __setattr__(self, attr: str, value: int) -> None:
        _write(self.path / self._files[attr], value)


def _memory_controller(path: Path, use_cgroupspy: bool) -> _MemoryFiles:
    if use_cgroupspy:
        try:
            from cgroupspy.controllers import MemoryController
        except ImportError:
            pass
        else:
            return MemoryController(_CgroupspyNode(path))  # type: ignore[no-any-return]
    return _PlainMemoryController(path)


@dataclass
class _CgroupspyNode:
    """All a cgroupspy controller needs of its node: the directory, as bytes."""

    path: Path

    @property
    def full_path(self) -> bytes:
        return os.fsencode(self.path)


# --------------------------------------------------------------------------
# Joining (child side)


def join_spec(spec: dict[str, Any], pid: int = 0) -> None:
    """Put ``pid`` (0: this process) under the limit described by ``spec``.

    Meant for the child right after fork: one open/write/close, or one setrlimit.
    """
    kind = spec["enforcement"]
    if kind in (Enforcement.CGROUP_V1, Enforcement.CGROUP_V2):
        fd = os.open(spec["procs"], os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, str(pid or os.getpid()).encode())
        finally:
            os.close(fd)
    elif kind == Enforcement.RLIMIT and spec.get("memory_limit"):
        if pid:
            raise CgroupError("an RLIMIT_AS limit can only be applied by the process itself")
        limit = int(spec["memory_limit"])
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


class AgentCgroup:
    """One daemon's group (or, on RLIMIT/NONE, just its limit)."""

    def __init__(
        self,
        agent: str,
        enforcement: Enforcement,
        path: Path | None,
        memory_limit: int | None,
        use_cgroupspy: bool = True,
    ) -> None:
        self.agent = agent
        self.enforcement = enforcement
        self.path = path
        self.memory_limit = memory_limit
        self._use_cgroupspy = use_cgroupspy

    @property
    def _is_cgroup(self) -> bool:
        return self.path is not None and self.enforcement in (Enforcement.CGROUP_V1, Enforcement.CGROUP_V2)

    def to_spec(self) -> dict[str, Any]:
        """What :func:`join_spec` needs, as plain JSON data."""
        spec: dict[str, Any] = {"enforcement": self.enforcement.value, "memory_limit": self.memory_limit}
        if self._is_cgroup:
            spec["procs"] = str(self.path / "cgroup.procs")  # type: ignore[operator]
        return spec

    @classmethod
    def from_spec(cls, agent: str, spec: dict[str, Any]) -> AgentCgroup:
        procs = spec.get("procs")
        path = Path(procs).parent if procs else None
        return cls(agent, Enforcement(spec["enforcement"]), path, spec.get("memory_limit"))

    def join(self, pid: int = 0) -> None:
        join_spec(self.to_spec(), pid)

    def procs(self) -> list[int]:
        """PIDs in the group now (empty if it is gone or not a cgroup)."""
        if not self._is_cgroup:
            return []
        try:
            return [int(p) for p in _read(self.path / "cgroup.procs").split()]  # type: ignore[operator]
        except FileNotFoundError:
            return []

    def oom_kills(self) -> int:
        """How many times the kernel OOM-killed a process of this group."""
        if not self._is_cgroup:
            return 0
        name = "memory.oom_control" if self.enforcement == Enforcement.CGROUP_V1 else "memory.events"
        try:
            return _keyed(self.path / name, "oom_kill")  # type: ignore[operator]
        except FileNotFoundError:
            return 0

    def memory_current(self) -> int | None:
        """Bytes charged to the group now (page cache included), None if unknown."""
        if not self._is_cgroup:
            return None
        try:
            if self.enforcement == Enforcement.CGROUP_V2:
                return int(_read(self.path / "memory.current"))  # type: ignore[operator]
            return _memory_controller(self.path, self._use_cgroupspy).usage_in_bytes  # type: ignore[arg-type]
        except FileNotFoundError:
            return None

    def kill_all(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to every process in the group."""
        if sig == signal.SIGKILL and self.enforcement == Enforcement.CGROUP_V2:
            kill_file = self.path / "cgroup.kill"  # type: ignore[operator]
            if kill_file.exists():
                _write(kill_file, 1)
                return
        for pid in self.procs():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def to_dict(self) -> dict[str, Any]:
        """For ``status``: how the limit is enforced and where usage stands."""
        return {
            "enforcement": self.enforcement.value,
            "path": str(self.path) if self.path else None,
            "memory_limit": self.memory_limit,
            "memory_current": self.memory_current(),
            "oom_kills": self.oom_kills(),
        }


# --------------------------------------------------------------------------
# The supervisor side


class CgroupManager:
    """Creates, describes and removes the per-daemon groups under one base."""

    def __init__(
        self,
        enforcement: Enforcement,
        base: Path | None = None,
        *,
        why: str = "",
        use_cgroupspy: bool = True,
    ) -> None:
        self.enforcement = enforcement
        self.base = base
        self.why = why
        self.use_cgroupspy = use_cgroupspy
        self._limits: dict[str, int | None] = {}

    @classmethod
    def detect(
        cls,
        *,
        name: str = "agentctl-swarm",
        prefer: str | None = None,
        limit_configured: bool = True,
        use_cgroupspy: bool = True,
    ) -> CgroupManager:
        """The best mechanism available here (or ``prefer``, or CgroupError).

        ``limit_configured=False`` (no ``agent.memory-limit``) still uses a
        cgroup when one is available, for accounting and clean removal, but
        picks NONE instead of RLIMIT and does not warn.
        """
        try:
            wanted = Enforcement(prefer) if prefer else None
        except ValueError:
            choices = ", ".join(e.value for e in Enforcement)
            raise CgroupError(f"unknown memory enforcement {prefer!r} (expected one of {choices})") from None
        if wanted in (Enforcement.RLIMIT, Enforcement.NONE):
            return cls(wanted, why=f"{wanted.value} requested")
        reasons = []
        for kind, finder in ((Enforcement.CGROUP_V2, _v2_base), (Enforcement.CGROUP_V1, _v1_base)):
            if wanted not in (None, kind):
                continue
            base, why = finder(name)
            if base is not None:
                return cls(kind, base, use_cgroupspy=use_cgroupspy)
            reasons.append(why)
        if wanted is not None:
            raise CgroupError(f"{wanted.value} is not available: {'; '.join(reasons)}")
        if not limit_configured:
            return cls(Enforcement.NONE, why="no memory limit configured and " + "; ".join(reasons))
        why = "; ".join(reasons)
        log.warning("memory limits are enforced with RLIMIT_AS (virtual memory, no OOM kill): %s", why)
        return cls(Enforcement.RLIMIT, why=why)

    @property
    def description(self) -> str:
        """One line for ``status``."""
        if self.base is not None:
            return f"{self.enforcement.value} memory at {self.base}"
        return f"{self.enforcement.value} ({self.why})" if self.why else self.enforcement.value

    def prepare_supervisor(self) -> None:
        """v2: move our processes into a leaf and enable controllers for children."""
        if self.enforcement != Enforcement.CGROUP_V2 or self.base is None:
            return
        leaf = self.base / SUPERVISOR_LEAF
        leaf.mkdir(parents=True, exist_ok=True)
        for pid in _read(self.base / "cgroup.procs").split():
            try:
                _write(leaf / "cgroup.procs", pid)
            except ProcessLookupError:
                pass
        wanted = {"memory", "cpu"} & _controllers(self.base, "controllers")
        _write(self.base / "cgroup.subtree_control", " ".join(f"+{c}" for c in sorted(wanted)))

    def _path(self, agent: str) -> Path | None:
        if self.base is None:
            return None
        if not agent or "/" in agent or agent in (".", "..", SUPERVISOR_LEAF):
            raise CgroupError(f"invalid agent name for a cgroup: {agent!r}")
        return self.base / agent

    def contains_process(self, pid: int) -> bool:
        """Is ``pid`` in one of our agent groups (not the supervisor's leaf)?"""
        if self.base is None:
            return False
        key, mount = ((UNIFIED, _v2_mount()) if self.enforcement == Enforcement.CGROUP_V2
                      else ("memory", _v1_memory_mount()))
        rel = process_cgroup(pid).get(key)
        if mount is None or rel is None:
            return False
        path = mount / rel.lstrip("/")
        return path.parent == self.base and path.name != SUPERVISOR_LEAF

    def group(self, agent: str) -> AgentCgroup:
        return AgentCgroup(agent, self.enforcement, self._path(agent), self._limits.get(agent), self.use_cgroupspy)

    def create(self, agent: str, memory_limit: int | None, cpu_weight: int | None = None) -> AgentCgroup:
        """Make (or update) the agent's group before it is spawned; idempotent."""
        self._limits[agent] = memory_limit
        path = self._path(agent)
        if path is not None:
            try:
                path.mkdir(parents=True, exist_ok=True)
                if self.enforcement == Enforcement.CGROUP_V1:
                    self._limit_v1(path, memory_limit)
                else:
                    self._limit_v2(path, memory_limit, cpu_weight)
            except OSError as exc:
                raise CgroupError(f"cannot set up cgroup {path}: {exc.strerror or exc}") from exc
        return self.group(agent)

    def _limit_v1(self, path: Path, limit: int | None) -> None:
        memory = _memory_controller(path, self.use_cgroupspy)
        value = limit if limit is not None else -1
        has_memsw = (path / "memory.memsw.limit_in_bytes").exists()
        # memsw must stay >= limit at every step: raise it first when growing.
        try:
            memory.limit_in_bytes = value
            if has_memsw:
                memory.memsw_limit_in_bytes = value
        except OSError as exc:
            if exc.errno != errno.EINVAL or not has_memsw:
                raise
            memory.memsw_limit_in_bytes = value
            memory.limit_in_bytes = value
        try:
            memory.swappiness = 0
        except OSError as exc:
            log.debug("cannot set memory.swappiness in %s: %s", path, exc)

    def _limit_v2(self, path: Path, limit: int | None, cpu_weight: int | None) -> None:
        _write(path / "memory.max", limit if limit is not None else "max")
        if (path / "memory.swap.max").exists():
            _write(path / "memory.swap.max", 0 if limit is not None else "max")
        if cpu_weight is not None and (path / "cpu.weight").exists():
            _write(path / "cpu.weight", cpu_weight)

    def remove(self, agent: str) -> None:
        """Kill what is left in the agent's group and delete it; fine if already gone."""
        self._limits.pop(agent, None)
        path = self._path(agent)
        if path is not None:
            _remove_dir(AgentCgroup(agent, self.enforcement, path, None, self.use_cgroupspy))

    def cleanup_stale(self) -> list[str]:
        """Remove the groups a crashed run left under the base; return their names."""
        if self.base is None or not self.base.is_dir():
            return []
        stale = sorted(
            e.name for e in os.scandir(self.base) if e.is_dir() and e.name != SUPERVISOR_LEAF
        )
        for agent in stale:
            log.info("removing stale cgroup %s (pids %s)", self.base / agent, self.group(agent).procs())
            self.remove(agent)
        return stale

    def remove_base(self) -> None:
        """At shutdown: remove the (now empty) base group if we created it (v1)."""
        if self.enforcement == Enforcement.CGROUP_V1 and self.base is not None:
            try:
                self.base.rmdir()
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.EBUSY, errno.ENOTEMPTY):
                    raise


def _remove_dir(group: AgentCgroup, timeout: float = _REMOVE_TIMEOUT_S) -> None:
    """SIGKILL the group until it is empty, then rmdir it; bounded by ``timeout``."""
    path = group.path
    assert path is not None
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        group.kill_all(signal.SIGKILL)
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise CgroupError(f"cannot remove cgroup {path}: {exc.strerror}") from exc
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
