"""Small Linux process helpers for the spawner and the supervisor.

Design note
-----------
* ``prctl`` is reached through ``ctypes.CDLL(None, use_errno=True)``: the
  standard library has no binding, and pulling in a compiled package for two
  calls is not worth it.  The calls are cheap and safe to make in a freshly
  forked child.
* ``PR_SET_PDEATHSIG`` fires when the *thread* that forked us exits, not the
  process; the supervisor forks from its main thread, so that is what we want.
  It is also cleared by a later fork and kept across exec, so it must be set in
  the process that should die (the daemon), after its last fork.
* ``close_fds`` uses ``close_range(2)`` (Linux 5.9, glibc 2.34) so that closing
  everything but a handful of descriptors costs one syscall per gap, not one per
  possible descriptor: the supervisor may hold thousands of sockets.
* Everything that reads ``/proc/PID`` treats a vanished or unreadable process as
  "no data" (``None``/empty), because the pid may exit between our listing and
  our read; that race is normal, not an error.
* ``fork_as_sibling`` is ``os.fork()`` with ``CLONE_PARENT``: the child's
  parent is the caller's parent. The fork-server uses it so that a daemon is
  the supervisor's own child from its first instruction, without an
  intermediate process that forks and exits (a fork, an exit and a
  reparenting per daemon). Python has no ``clone`` binding, so it is the raw
  syscall between CPython's own ``PyOS_BeforeFork`` / ``PyOS_AfterFork_*``
  hooks (exactly what ``os.fork`` runs), called with the GIL held. What it
  skips of glibc's ``fork()``: taking malloc/stdio locks (no other thread can
  hold them: it refuses a multi-threaded caller), ``pthread_atfork`` handlers
  (none that matter here: OpenSSL notices a fork by the PID change and reseeds),
  re-registering the robust-mutex list, and updating the TID cached in the
  thread descriptor, which glibc tolerates as it does after ``vfork``
  (``raise`` and ``pthread_kill`` on oneself ask the kernel for the TID).
  ``sibling_forker`` is the same fork prepared once, without the per-call
  thread check, for the fork-server's loop (which rules threads out itself):
  every page that loop writes between two forks ends up in a daemon's USS.
* ``/proc/PID/task/TID/children`` needs ``CONFIG_PROC_CHILDREN``, which the
  kernels we run on lack, so ``children_of`` scans ``/proc/*/stat``.
"""

from __future__ import annotations

import _signal  # the C functions behind ``signal``: see set_signal
import ctypes
import errno
import functools
import os
import platform
import resource
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37
PR_SET_MEMORY_MERGE = 67  # Linux 6.4
KSM_RUN = Path("/sys/kernel/mm/ksm/run")

#: Key of the unified (cgroup v2) hierarchy in :func:`process_cgroup`'s result.
UNIFIED = ""

_PROC = Path("/proc")
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, arg2: int | ctypes.c_void_p = 0) -> None:
    """Call prctl(2) and turn a failure into OSError with the real errno."""
    if _libc.prctl(option, arg2, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


_CLONE_PARENT = 0x00008000
_SYS_CLONE = {"x86_64": 56, "aarch64": 220}  # arches where clone(flags, 0, 0, 0, 0) is fork-like


@functools.lru_cache(maxsize=None)  # built once, not on every fork
def sibling_forker() -> "Callable[[], int] | None":
    """``fork_as_sibling`` without its thread check, prepared once for a caller that
    forks often and has made sure that it has a single thread (the fork-server).

    The ctypes functions and their arguments are built here, so that a fork
    allocates next to nothing: every page the fork-server writes between two
    forks is copied into the newest daemon. None on an unknown architecture."""
    nr = _SYS_CLONE.get(platform.machine())
    if nr is None:
        return None
    libc = ctypes.PyDLL(None)  # PyDLL: the GIL stays held
    before, in_child, in_parent = libc.PyOS_BeforeFork, libc.PyOS_AfterFork_Child, libc.PyOS_AfterFork_Parent
    for hook in (before, in_child, in_parent):
        hook.argtypes, hook.restype = (), None
    clone = libc.syscall
    clone.restype = ctypes.c_long
    zero = ctypes.c_long(0)
    args = (ctypes.c_long(nr), ctypes.c_long(_CLONE_PARENT | signal.SIGCHLD), zero, zero, zero, zero)
    errno_location = libc.__errno_location
    errno_location.restype = ctypes.POINTER(ctypes.c_int)

    def fork() -> int:
        before()
        pid = clone(*args)
        if pid == 0:
            in_child()
            return 0
        err = errno_location()[0] if pid < 0 else 0  # read before anything can change it
        in_parent()
        if pid < 0:
            raise OSError(err, f"clone(CLONE_PARENT): {os.strerror(err)}")
        return pid
    return fork


def can_fork_as_sibling() -> bool:
    """True where ``fork_as_sibling`` works: a known architecture, one thread."""
    return _SYS_CLONE.get(platform.machine()) is not None and thread_count() == 1


def thread_count() -> int:
    """Threads in this process (0 if /proc cannot tell).

    ``/proc/self/task`` has 2 + one link per thread: a stat, where listing the
    directory would allocate a 32 kB buffer."""
    try:
        links = os.stat("/proc/self/task").st_nlink - 2
        return links if links > 0 else len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


def fork_as_sibling() -> int:
    """Like ``os.fork()``, but the child's parent is our parent. 0 in the child.

    Only for a single-threaded caller (see the design note); OSError if unsupported.
    """
    fork = sibling_forker()
    if fork is None or thread_count() != 1:
        raise OSError(errno.ENOSYS, "fork_as_sibling needs x86_64 or aarch64 and a single thread")
    return fork()


def set_signal(sig: int, handler: "Callable[[int, Any], None] | int") -> None:
    """``signal.signal(sig, handler)`` without the wrapper's enum conversions.

    ``signal.signal`` converts its arguments and its result to and from enums,
    which runs the enum machinery's Python code; in a forked daemon every shared
    object that touches is a copied page (asyncio's ``add_signal_handler``, which
    also builds the set of all valid signals as enums, cost a daemon 0.3 MB, and
    ``signal.signal`` itself 0.13 MB for two calls; measured). The C function
    behind it takes plain ints and handlers (SIG_DFL and SIG_IGN as the ints)."""
    _signal.signal(sig, handler if callable(handler) else int(handler))


def set_pdeathsig(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``sig`` to us when our parent (thread) dies."""
    _prctl(PR_SET_PDEATHSIG, int(sig))


def set_child_subreaper(on: bool = True) -> None:
    """Make orphaned descendants reparent to us instead of to init."""
    _prctl(PR_SET_CHILD_SUBREAPER, int(on))


def set_memory_merge(on: bool) -> bool:
    """Offer all of this process's memory to kernel same-page merging (KSM), or stop.

    Kept across fork and execve. Whether pages are ever merged is the
    administrator's choice (``KSM_RUN``). False where the kernel has no such prctl
    (before 6.4, or built without KSM)."""
    try:
        _prctl(PR_SET_MEMORY_MERGE, int(on))
    except OSError:
        return False
    return True


def ksm_running() -> bool:
    """Whether ksmd merges pages on this machine (``/sys/kernel/mm/ksm/run`` is 1)."""
    try:
        return KSM_RUN.read_text().strip() == "1"
    except OSError:
        return False


def get_child_subreaper() -> bool:
    """Whether this process is a child subreaper."""
    value = ctypes.c_int(0)
    _prctl(PR_GET_CHILD_SUBREAPER, ctypes.cast(ctypes.pointer(value), ctypes.c_void_p))
    return bool(value.value)


def pidfd_open(pid: int) -> int:
    """A pidfd for ``pid``: readable when it exits, usable with waitid(P_PIDFD)."""
    return os.pidfd_open(pid)


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the new soft limit.

    A swarm of 1000 daemons needs one IPC socket and one pidfd per daemon in the
    supervisor, far past the usual soft limit of 1024.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = int(Path("/proc/sys/fs/nr_open").read_text())
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


_close_range = getattr(_libc, "close_range", None)
_MAX_FD = 0xFFFFFFFF  # close_range's "to the end" (~0U)


def _close_span(low: int, high: int) -> None:
    """Close descriptors low..high inclusive, with one syscall if we can."""
    if low > high:
        return
    if _close_range is not None:
        if _close_range(ctypes.c_uint(low), ctypes.c_uint(high), ctypes.c_int(0)) == 0:
            return
    os.closerange(low, min(high, os.sysconf("SC_OPEN_MAX") - 1) + 1)


def close_fds(keep: set[int] | frozenset[int] = frozenset()) -> None:
    """Close every descriptor from 3 up except those in ``keep`` (0-2 stay open)."""
    low = 3
    for fd in sorted(fd for fd in keep if fd >= 3):
        _close_span(low, fd - 1)
        low = fd + 1
    _close_span(low, _MAX_FD)


def _read_proc(pid: int | str, name: str) -> str | None:
    """Text of /proc/PID/<name>, or None if the process is gone or hidden."""
    try:
        return (_PROC / str(pid) / name).read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def memory_usage(pid: int) -> dict[str, int] | None:
    """RSS, USS and PSS of ``pid`` in bytes, from /proc/PID/smaps_rollup."""
    text = _read_proc(pid, "smaps_rollup")
    if not text:
        return None
    kb: dict[str, int] = {}
    for line in text.splitlines()[1:]:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            kb[key] = int(parts[0])
    uss = kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0)
    return {"rss": kb.get("Rss", 0) * 1024, "uss": uss * 1024, "pss": kb.get("Pss", 0) * 1024}


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the comm, so field 3 (state) is index 0.

    The comm is in parentheses and may itself contain spaces and ')', so split
    after the *last* ')'.
    """
    text = _read_proc(pid, "stat")
    if not text:
        return None
    return text[text.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of ``pid`` in seconds (None if it is gone)."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _ppid(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else None


def children_of(pid: int, *, recursive: bool = False) -> list[int]:
    """PIDs whose parent is ``pid`` (all descendants if ``recursive``), sorted."""
    parents: dict[int, int] = {}
    for entry in os.scandir(_PROC):
        if entry.name.isdigit():
            ppid = _ppid(int(entry.name))
            if ppid is not None:
                parents[int(entry.name)] = ppid
    wanted, found = {pid}, set()
    while True:
        new = {child for child, parent in parents.items() if parent in wanted} - found
        found |= new
        if not recursive or not new:
            return sorted(found)
        wanted = new


def parent_pid(pid: int) -> int | None:
    """The parent of ``pid`` from /proc/PID/stat (None when gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def ancestors(pid: int, limit: int = 64) -> list[int]:
    """``pid``'s parent, grandparent, … up to init (at most ``limit``)."""
    chain: list[int] = []
    while len(chain) < limit:
        parent = parent_pid(pid)
        if not parent or parent in chain:
            break
        chain.append(parent)
        pid = parent
    return chain


def process_cgroup(pid: int | str = "self") -> dict[str, str]:
    """Controller -> cgroup path from /proc/PID/cgroup (v2 under :data:`UNIFIED`).

    ``name=systemd`` style named hierarchies keep their ``name=`` key; a line
    for several controllers (``cpu,cpuacct``) yields one key per controller.
    """
    text = _read_proc(pid, "cgroup")
    result: dict[str, str] = {}
    for line in (text or "").splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [UNIFIED]:
            result[controller] = path
    return result


@dataclass(frozen=True)
class ExitInfo:
    """How a child ended, decoded once: exactly one of code/signal is set."""

    code: int | None
    signal: int | None
    reason: str

    @property
    def ok(self) -> bool:
        return self.code == 0


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _killed(sig: int, core: bool = False) -> ExitInfo:
    suffix = " (core dumped)" if core else ""
    return ExitInfo(None, sig, f"killed by {_signal_name(sig)}{suffix}")


def _exited(code: int) -> ExitInfo:
    return ExitInfo(code, None, "ok" if code == 0 else f"exit {code}")


def describe_exit(status: int | os.waitid_result) -> ExitInfo:
    """Decode a wait status (os.waitpid) or an os.waitid() result."""
    if isinstance(status, os.waitid_result):
        if status.si_code == os.CLD_EXITED:
            return _exited(status.si_status)
        return _killed(status.si_status, core=status.si_code == os.CLD_DUMPED)
    if os.WIFSIGNALED(status):
        return _killed(os.WTERMSIG(status), core=os.WCOREDUMP(status))
    return _exited(os.waitstatus_to_exitcode(status))


def describe_returncode(returncode: int) -> ExitInfo:
    """Decode a subprocess/asyncio returncode (negative means killed by -rc)."""
    return _killed(-returncode) if returncode < 0 else _exited(returncode)
