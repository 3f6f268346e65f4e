"""sd_notify against a real Unix datagram socket, through sdnotify and our fallback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentctl_swarm.system.notify import Notifier

BACKENDS = [pytest.param(True, id="sdnotify"), pytest.param(False, id="fallback")]


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound datagram socket, named in NOTIFY_SOCKET as systemd would."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def _received(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


@pytest.mark.parametrize("use_sdnotify", BACKENDS)
def test_ready_with_status_is_one_datagram(notify_socket: socket.socket, use_sdnotify: bool) -> None:
    notifier = Notifier(use_sdnotify=use_sdnotify)
    assert notifier.enabled
    notifier.ready("12 daemons, 3 active")
    assert _received(notify_socket) == ["READY=1", "STATUS=12 daemons, 3 active"]


@pytest.mark.parametrize("use_sdnotify", BACKENDS)
def test_each_message(notify_socket: socket.socket, use_sdnotify: bool) -> None:
    notifier = Notifier(use_sdnotify=use_sdnotify)
    notifier.status("line one\nREADY=1")  # a newline must not smuggle in an assignment
    assert _received(notify_socket) == ["STATUS=line one READY=1"]
    notifier.stopping()
    assert _received(notify_socket) == ["STOPPING=1"]
    notifier.watchdog()
    assert _received(notify_socket) == ["WATCHDOG=1"]
    notifier.extend_timeout(2.5)
    assert _received(notify_socket) == ["EXTEND_TIMEOUT_USEC=2500000"]


@pytest.mark.parametrize("use_sdnotify", BACKENDS)
def test_reloading_carries_monotonic_timestamp(notify_socket: socket.socket, use_sdnotify: bool) -> None:
    notifier = Notifier(use_sdnotify=use_sdnotify)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = _received(notify_socket)
    assert first == "RELOADING=1"
    key, _, usec = second.partition("=")
    assert key == "MONOTONIC_USEC" and before <= int(usec) <= after


@pytest.mark.parametrize("use_sdnotify", BACKENDS)
def test_abstract_socket_name(monkeypatch: pytest.MonkeyPatch, use_sdnotify: bool) -> None:
    name = f"agentctl-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        Notifier(use_sdnotify=use_sdnotify).ready()
        assert _received(sock) == ["READY=1"]


def test_without_notify_socket_everything_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled
    notifier.ready("x")
    notifier.reloading()
    notifier.watchdog()
    assert notifier.watchdog_interval() is None


@pytest.mark.parametrize("use_sdnotify", BACKENDS)
def test_vanished_socket_does_not_raise(notify_socket: socket.socket, tmp_path: Path, use_sdnotify: bool) -> None:
    notifier = Notifier(use_sdnotify=use_sdnotify)
    notify_socket.close()
    (tmp_path / "notify.sock").unlink()
    notifier.ready()  # systemd went away: nothing to tell, nothing to raise
    notifier.status("still alive")


def test_children_do_not_inherit_the_notify_variables(notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    notifier = Notifier()
    assert notifier.watchdog_interval() == 2.0
    code = "import os; print(sorted(k for k in os.environ if k in ('NOTIFY_SOCKET','WATCHDOG_USEC','WATCHDOG_PID')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("10000000", None, 5.0),
        ("10000000", "self", 5.0),
        ("10000000", "1", None),  # meant for another process (e.g. a parent shell)
        ("0", None, None),
        (None, None, None),
        ("garbage", None, None),
    ],
)
def test_watchdog_interval(usec: str | None, pid: str | None, expected: float | None) -> None:
    env = {"NOTIFY_SOCKET": "/nonexistent"}
    if usec is not None:
        env["WATCHDOG_USEC"] = usec
    if pid is not None:
        env["WATCHDOG_PID"] = str(os.getpid()) if pid == "self" else pid
    assert Notifier(environ=env, use_sdnotify=False).watchdog_interval() == expected
    assert "WATCHDOG_USEC" not in env
