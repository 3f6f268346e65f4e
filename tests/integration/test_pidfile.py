"""The supervisor's pid-file lock, with real processes holding and losing it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentctl_swarm.errors import SwarmError
from agentctl_swarm.system.pidfile import AlreadyRunning, PidFile, running_pid

HOLDER = """
import sys, time
from agentctl_swarm.system.pidfile import PidFile
lock = PidFile(sys.argv[1])
lock.acquire()
print("locked", flush=True)
time.sleep(60)
"""


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """A separate process that holds the lock on tmp_path/swarm.pid."""
    path = tmp_path / "swarm.pid"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    yield proc, path
    proc.kill()
    proc.wait()


def test_second_start_fails_naming_the_holder(holder: tuple[subprocess.Popen[str], Path]) -> None:
    proc, path = holder
    with pytest.raises(AlreadyRunning) as caught:
        PidFile(path).acquire()
    assert caught.value.pid == proc.pid
    assert str(caught.value) == f"agentctl-swarm is already running (pid {proc.pid}; lock file {path})"
    assert isinstance(caught.value, SwarmError)
    assert running_pid(path) == proc.pid


def test_stale_file_after_sigkill_does_not_block(holder: tuple[subprocess.Popen[str], Path]) -> None:
    proc, path = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert path.read_text().strip() == str(proc.pid)  # the file survives the crash...
    assert running_pid(path) is None  # ...but nobody holds the lock
    with PidFile(path) as lock:
        assert lock.held
        assert path.read_text() == f"{os.getpid()}\n"
        assert running_pid(path) == os.getpid()
    assert not path.exists()


def test_lock_does_not_leak_into_a_child(tmp_path: Path) -> None:
    path = tmp_path / "swarm.pid"
    lock = PidFile(path)
    lock.acquire()
    fd = lock.fileno()
    assert fd is not None and os.get_inheritable(fd) is False
    code = (
        "import os, time\n"
        "print([os.readlink(f'/proc/self/fd/{n}') for n in os.listdir('/proc/self/fd')"
        " if os.path.exists(f'/proc/self/fd/{n}')], flush=True)\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], close_fds=False, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        open_in_child = child.stdout.readline()
        assert "/dev/" in open_in_child or "pipe:" in open_in_child  # the listing itself worked
        assert str(path) not in open_in_child
        lock.release()
        # With the supervisor gone but its child alive, a new start must succeed.
        new = subprocess.run([sys.executable, "-c", HOLDER.replace("time.sleep(60)", ""), str(path)], timeout=30)
        assert new.returncode == 0
    finally:
        child.kill()
        child.wait()


def test_release_only_when_held_and_acquire_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "run" / "swarm.pid"
    lock = PidFile(path)
    lock.release()  # not held: nothing to do
    lock.acquire()
    lock.acquire()
    assert lock.held and path.exists()
    other = PidFile(path)
    with pytest.raises(AlreadyRunning):
        other.acquire()  # a second descriptor in the same process conflicts too
    other.release()
    assert path.exists()  # a loser never removes the winner's file
    lock.release()
    assert not lock.held and not path.exists()


def test_running_pid_without_a_file(tmp_path: Path) -> None:
    assert running_pid(tmp_path / "absent.pid") is None
