"""Child exit watching without polling and without ``waitpid(-1)``.

Each known child gets a pidfd registered with the event loop; when it becomes
readable the child has exited and is reaped with ``waitid(P_PIDFD)``, its status
decoded once. Daemons that the fork-server double-forks (its fallback when it
cannot fork with ``CLONE_PARENT``) become our children only after their
intermediate parent exits (we are a child subreaper): a pidfd can turn
readable a moment before that, so an ``ECHILD`` is retried shortly.

Reparented strays (orphans of a dead daemon's session) are also our children.
After each SIGCHLD and each known reap, ``reap_strays`` peeks with
``waitid(P_ALL, WNOWAIT)`` and reaps only PIDs that nobody is watching.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Callable

from .system.proc import ExitInfo, describe_exit

log = logging.getLogger(__name__)
_RETRY_S = 0.01
_MAX_RETRIES = 500


class Reaper:
    """Calls ``on_exit(pid, ExitInfo)`` once for each watched child."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._fds: dict[int, int] = {}  # pid -> pidfd
        self._callbacks: dict[int, Callable[[int, ExitInfo], None]] = {}

    def watch(self, pid: int, on_exit: Callable[[int, ExitInfo], None]) -> None:
        fd = os.pidfd_open(pid)
        self._fds[pid] = fd
        self._callbacks[pid] = on_exit
        self._loop.add_reader(fd, self._reap, pid, 0)

    def watching(self, pid: int) -> bool:
        return pid in self._fds

    def _reap(self, pid: int, tries: int) -> None:
        fd = self._fds.get(pid)
        if fd is None:
            return
        try:
            result = os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            self._loop.remove_reader(fd)
            if tries < _MAX_RETRIES:  # not reparented to us yet
                self._loop.call_later(_RETRY_S, self._reap, pid, tries + 1)
            else:
                self._finish(pid, ExitInfo(None, None, "lost (not our child)"))
            return
        if result is None:
            return
        self._finish(pid, describe_exit(result))

    def _finish(self, pid: int, info: ExitInfo) -> None:
        fd = self._fds.pop(pid)
        self._loop.remove_reader(fd)
        os.close(fd)
        callback = self._callbacks.pop(pid)
        try:
            callback(pid, info)
        finally:
            self.reap_strays()

    def reap_strays(self) -> None:
        """Reap exited children nobody watches; stop at the first watched one."""
        while True:
            try:
                peek = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if peek is None or peek.si_pid in self._fds:
                return
            try:
                os.waitpid(peek.si_pid, os.WNOHANG)
            except ChildProcessError:
                return
            log.debug("reaped stray child %s", peek.si_pid)

    def close(self) -> None:
        for pid, fd in list(self._fds.items()):
            self._loop.remove_reader(fd)
            os.close(fd)
        self._fds.clear()
        self._callbacks.clear()
