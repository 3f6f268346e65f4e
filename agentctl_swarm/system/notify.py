"""sd_notify(3) for the supervisor: READY, STATUS, RELOADING, STOPPING, WATCHDOG.

A no-op when ``NOTIFY_SOCKET`` is unset (not started by systemd as
``Type=notify``).  Uses the ``sdnotify`` package when installed and otherwise
sends the datagram itself: the protocol is one ``KEY=VALUE\\n...`` datagram to
a Unix socket, where a name starting with ``@`` is in the abstract namespace.

The variables are read once and, as ``sd_notify(unset_environment=1)`` does,
removed from ``os.environ`` so that daemons and agent sessions never inherit
them: a child that could reach the notify socket could tell systemd we are
ready, or keep a hung supervisor's watchdog alive.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import MutableMapping
from typing import Protocol

log = logging.getLogger(__name__)

_ENV_KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class _Sender(Protocol):
    def notify(self, state: str) -> None: ...


class _DatagramSender:
    """What sdnotify does, for installs without it (python3-sdnotify is optional)."""

    def __init__(self, address: str) -> None:
        if address.startswith("@"):
            address = "\0" + address[1:]
        self._address = address
        # Non-blocking: if nobody reads the socket, a notification is lost, never the loop.
        self._sock = socket.socket(socket.AF_UNIX,
                                   socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)

    def notify(self, state: str) -> None:
        try:
            self._sock.sendto(state.encode(), self._address)
        except OSError as exc:
            log.debug("sd_notify to %s failed: %s", self._address, exc)


def _make_sender(address: str, use_sdnotify: bool) -> _Sender:
    # sdnotify reads os.environ itself, so only use it for that address.
    if use_sdnotify and address == os.environ.get("NOTIFY_SOCKET"):
        try:
            import sdnotify
        except ImportError:
            pass
        else:
            notifier = sdnotify.SystemdNotifier()  # reads NOTIFY_SOCKET itself
            sock = getattr(notifier, "socket", None)
            if sock is not None:
                sock.setblocking(False)  # an unread notify socket must not stop the loop
            return notifier
    return _DatagramSender(address)


def _one_line(text: str) -> str:
    """A newline inside STATUS= would start a new assignment; flatten it."""
    return " ".join(text.split())


class Notifier:
    """The supervisor's voice to systemd; every method is safe to call outside it."""

    def __init__(
        self,
        *,
        environ: MutableMapping[str, str] | None = None,
        use_sdnotify: bool = True,
        unset_environment: bool = True,
    ) -> None:
        env = os.environ if environ is None else environ
        self._address = env.get("NOTIFY_SOCKET", "")
        self._watchdog_usec = env.get("WATCHDOG_USEC")
        self._watchdog_pid = env.get("WATCHDOG_PID")
        self.enabled = bool(self._address)
        self._sender = _make_sender(self._address, use_sdnotify) if self.enabled else None
        if unset_environment:
            for key in _ENV_KEYS:
                env.pop(key, None)

    def send(self, *assignments: str) -> None:
        """Send ``KEY=VALUE`` assignments as one datagram (dropped when disabled)."""
        if self._sender is not None:
            self._sender.notify("\n".join(assignments))

    def ready(self, status: str | None = None) -> None:
        self.send("READY=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def status(self, text: str) -> None:
        self.send(f"STATUS={_one_line(text)}")

    def reloading(self) -> None:
        """RELOADING=1 with the timestamp systemd 253+ wants for Type=notify-reload."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> None:
        """Ask for more time in the current start/stop/reload job."""
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half the timeout), or None if unwatched."""
        if not self._watchdog_usec or not self._watchdog_usec.isdigit():
            return None
        if self._watchdog_pid and self._watchdog_pid != str(os.getpid()):
            return None
        usec = int(self._watchdog_usec)
        return usec / 2 / 1_000_000 if usec > 0 else None
