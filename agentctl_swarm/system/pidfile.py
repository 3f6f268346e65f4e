"""One supervisor per user: an flock(2)'d pid file.

Design note
-----------
The lock, not the file, is the truth.  The kernel drops an flock when the last
descriptor of the open file goes away, so a supervisor killed with SIGKILL
leaves a file behind but no lock, and the next start simply takes it.  The
content (our pid) is only there to name the holder in the error message.

Two subtleties:

* The descriptor is opened ``O_CLOEXEC`` and kept open for the life of the
  supervisor.  A leaked copy in a daemon or an agent session would keep the
  lock alive after the supervisor died and block every restart.
* ``release()`` unlinks before it closes.  A rival that opened the old path just
  before the unlink could then lock the now-nameless inode while a third process
  creates and locks a fresh file under the name: two "owners".  ``acquire()``
  therefore checks, after locking, that the path still names the inode it
  locked, and starts over if not.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from types import TracebackType

from agentctl_swarm.errors import SwarmError


class AlreadyRunning(SwarmError):
    """Another supervisor holds the lock."""

    def __init__(self, pid: int | None, path: Path) -> None:
        self.pid = pid
        self.path = path
        shown = pid if pid is not None else "unknown"
        super().__init__(f"agentctl-swarm is already running (pid {shown}; lock file {path})")


def _read_pid(fd: int) -> int | None:
    """The pid written in the file, or None if empty or garbled."""
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


def _flock_entry(fd: int) -> tuple[bool, int | None] | None:
    """(locked, pid) for this file from /proc/locks; None if that file is unreadable.

    Looking is better than probing with flock(LOCK_SH): a probe would make a
    concurrent start fail.  It also names the holder when the file is still
    empty (the holder writes its pid just after locking).
    """
    st = os.fstat(fd)
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == wanted:
            return True, int(parts[4]) if parts[4].isdigit() and parts[4] != "0" else None
    return False, None


def _holder_pid(fd: int) -> int | None:
    entry = _flock_entry(fd)
    return _read_pid(fd) or (entry[1] if entry else None)


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the inode open on ``fd``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def _try_lock(fd: int, operation: int) -> bool:
    """flock without blocking; False if someone else holds a conflicting lock."""
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise
    return True


class PidFile:
    """An exclusive, kernel-held lock on ``path`` that names our pid while held."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock and write our pid, or raise :class:`AlreadyRunning`."""
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            if not _try_lock(fd, fcntl.LOCK_EX):
                pid = _holder_pid(fd)
                os.close(fd)
                raise AlreadyRunning(pid, self.path)
            if _same_file(fd, self.path):
                break
            os.close(fd)  # we locked an inode a releasing holder just unlinked
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Remove the file and drop the lock; a no-op unless we hold it."""
        if self._fd is None:
            return
        try:
            if _same_file(self._fd, self.path):
                self.path.unlink()
        finally:
            os.close(self._fd)
            self._fd = None

    def fileno(self) -> int | None:
        return self._fd

    def __enter__(self) -> PidFile:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def running_pid(path: Path | str) -> int | None:
    """Pid of the live supervisor holding ``path``, or None (absent or stale file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        entry = _flock_entry(fd)
        if entry is None:  # no /proc/locks: probe, briefly taking a shared lock
            if _try_lock(fd, fcntl.LOCK_SH):
                return None
            return _holder_pid(fd)
        locked, pid = entry
        return (_read_pid(fd) or pid) if locked else None
    finally:
        os.close(fd)
