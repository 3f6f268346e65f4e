"""``agent.memory-limit`` end to end: a whole swarm, a real kernel, a real overrun.

Two enforcement paths are exercised here, on the host:

* **cgroup v1 as root.**  The supervisor makes a memory group per daemon under
  its own v1 memory cgroup, ``<ours>/agentctl-swarm-<uid>-<hash>/<agent>``; a
  session that allocates past the limit is OOM-killed by the kernel and its task
  fails with ``oom``.  A limit smaller than what a daemon itself needs gets the
  *daemon* OOM-killed: the supervisor reports ``oom`` and restarts it with the
  backoff delays (1 s, 2 s, ...).  After ``stop`` no group is left.
* **RLIMIT_AS as an ordinary user.**  The pyenv Python under /root is not
  readable by others, so the swarm runs as the user ``swarmtest`` (created if
  absent) from Debian's /usr/bin/python3: a throwaway venv under /tmp made with
  ``--system-site-packages`` (Debian's python3-yaml, -psutil, -websockets,
  -cryptography, -sdnotify, -setproctitle are the dependencies) and a plain copy
  of the ``agentctl_swarm`` package in its site-packages: no pip, no build, the
  checkout untouched.  The session's MemoryError is classified ``oom`` and the
  daemon keeps running.

The fake claude CLI (tests/fakes/fake_claude.py) allocates on ``[fake:alloc:MB]``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentctl_swarm.system.cgroups import CgroupError, CgroupManager
from agentctl_swarm.system.proc import process_cgroup
from tests.swarmlib import FAKE_CLAUDE, ROOT, Swarm, SwarmError, base_config

USER = "swarmtest"
DEBIAN_PYTHON = "/usr/bin/python3"
DEBIAN_MODULES = ("yaml", "psutil", "websockets", "cryptography", "sdnotify")
AGENT = "swarm-general-001"
READY_TIMEOUT = 90.0  # the suite shares two cores with benchmarks and soaks
TASK_TIMEOUT = 90.0


# ----------------------------------------------------------------- helpers

def v1_memory_problem() -> str | None:
    """Why the cgroup v1 path cannot be used here (None when it can)."""
    if os.geteuid() != 0:
        return "the cgroup v1 memory controller is writable only by root"
    try:
        CgroupManager.detect(name=f"agentctl-swarm-probe-{os.getpid()}", prefer="cgroup-v1")
    except CgroupError as exc:
        return str(exc)
    return None


def swarm_base(home: Path, uid: int = 0) -> Path:
    """The v1 group the supervisor of the swarm in ``home`` uses (supervisor._cgroup_name)."""
    digest = hashlib.sha256(str(home / ".agentctl").encode()).hexdigest()[:10]
    own = process_cgroup("self")["memory"]
    return Path("/sys/fs/cgroup/memory") / own.lstrip("/") / f"agentctl-swarm-{uid}-{digest}"


def log_entries(swarm: Swarm, event: str) -> list[dict[str, Any]]:
    """supervisor.log records with EVENT=event."""
    path = swarm.home / ".agentctl" / "logs" / "supervisor.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return [e for e in map(json.loads, lines) if e.get("event") == event]


def agent(swarm: Swarm) -> dict[str, Any]:
    return swarm.agents()[AGENT]


# ------------------------------------------------------- cgroup v1, as root

@pytest.fixture
def v1_swarm(tmp_path: Path) -> Iterator[Swarm]:
    problem = v1_memory_problem()
    if problem is not None:
        pytest.skip(f"cgroup v1 path unavailable: {problem}")
    swarm = Swarm(tmp_path / "home", base_config(count=1, agent={"memory-limit": "150M"}))
    with swarm:
        yield swarm


def test_v1_session_over_the_limit_is_oom_killed(v1_swarm: Swarm) -> None:
    snap = v1_swarm.start(timeout=READY_TIMEOUT).status()
    assert snap["supervisor"]["memory_enforcement"] == "cgroup-v1"
    base = swarm_base(v1_swarm.home)
    group = base / AGENT
    assert int((group / "memory.limit_in_bytes").read_text()) == 150 << 20
    daemon = agent(v1_swarm)
    assert daemon["pid"] in map(int, (group / "cgroup.procs").read_text().split())
    assert isinstance(daemon["memory_usage_mb"], float)

    v1_swarm.add_task("grow [fake:alloc:400]", "big")
    task = v1_swarm.wait_tasks(["big"], ("done", "failed"), timeout=TASK_TIMEOUT)["big"]
    assert (task["state"], task["reason"]) == ("failed", "oom"), task
    oom_control = (group / "memory.oom_control").read_text()
    assert "oom_kill 0" not in oom_control, oom_control
    after = agent(v1_swarm)
    assert (after["pid"], after["restarts"], after["status"]) == (daemon["pid"], 0, "idle")

    v1_swarm.add_task("small [fake:success]", "small")
    assert v1_swarm.wait_tasks(["small"], timeout=TASK_TIMEOUT)["small"]["agent"] == AGENT
    assert v1_swarm.stop() == 0
    assert not group.exists(), "the agent's cgroup outlived the swarm"


def test_v1_no_cgroup_left_after_stop(v1_swarm: Swarm) -> None:
    v1_swarm.start(timeout=READY_TIMEOUT)
    base = swarm_base(v1_swarm.home)
    assert (base / AGENT).is_dir()
    assert v1_swarm.stop() == 0
    leftovers = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.exists() else []
    assert leftovers == [], f"agent groups left under {base}"
    assert not base.exists(), f"the swarm's base group {base} was left behind"


def test_v1_daemon_over_its_limit_is_oom_and_restarted_with_backoff(tmp_path: Path) -> None:
    """1 MiB: a daemon's own first page faults after fork exceed it, so the kernel kills the daemon
    (2 MiB no longer did: what a daemon copies itself, and so is charged for, is ~2 MB)."""
    problem = v1_memory_problem()
    if problem is not None:
        pytest.skip(f"cgroup v1 path unavailable: {problem}")
    config = base_config(count=1, agent={"memory-limit": "1M"}, **{"start-timeout": "1s"})
    with Swarm(tmp_path / "home", config) as swarm:
        swarm.start(wait_ready=False)
        swarm.wait_for(lambda: agent(swarm)["restarts"] >= 2, timeout=60, what="two restarts")
        assert agent(swarm)["last_exit"] == "oom"
        crashes = [e for e in log_entries(swarm, "crash") if e.get("agent") == AGENT]
        assert crashes and all(e.get("reason") == "oom" for e in crashes), crashes
        delays = [e["msg"] for e in log_entries(swarm, "backoff") if e.get("agent") == AGENT][:2]
        assert delays == [f"restarting {AGENT} in 1s (restart 1)", f"restarting {AGENT} in 2s (restart 2)"]
        assert swarm.stop() == 0
    assert not (swarm_base(swarm.home) / AGENT).exists()


# ------------------------------------------------------- RLIMIT_AS, as a user

def rlimit_problem() -> str | None:
    """Why a swarm cannot be run as an unprivileged user here (None when it can)."""
    if os.geteuid() != 0:
        return "switching to the unprivileged user needs root"
    if not os.access(DEBIAN_PYTHON, os.X_OK):
        return f"{DEBIAN_PYTHON} (Debian's python3) is not installed"
    probe = subprocess.run([DEBIAN_PYTHON, "-c", "import venv, " + ", ".join(DEBIAN_MODULES)],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        return ("Debian's python3 lacks a dependency (apt-get install python3-venv python3-yaml "
                "python3-psutil python3-websockets python3-cryptography python3-sdnotify): "
                + probe.stderr.strip().splitlines()[-1])
    return None


def ensure_user(name: str) -> pwd.struct_passwd:
    """The unprivileged test user, created (``useradd -m``) when absent."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", name], check=True, capture_output=True, timeout=60)
        return pwd.getpwnam(name)


@pytest.fixture(scope="module")
def user_python() -> Iterator[tuple[str, str]]:
    """(python, fake agent) readable by the test user: a venv over Debian's python3 in /tmp."""
    problem = rlimit_problem()
    if problem is not None:
        pytest.skip(problem)
    ensure_user(USER)
    root = Path(tempfile.mkdtemp(prefix="agentctl-rlimit-"))
    try:
        venv = root / "venv"
        subprocess.run([DEBIAN_PYTHON, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                       check=True, capture_output=True, timeout=120)
        site = next(venv.glob("lib/python3*/site-packages"))
        shutil.copytree(ROOT / "agentctl_swarm", site / "agentctl_swarm",
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(FAKE_CLAUDE, root / "fake_claude.py")
        for path in (root, *root.rglob("*")):
            path.chmod(0o755 if path.is_dir() else path.stat().st_mode | 0o444)
        yield str(venv / "bin" / "python"), str(root / "fake_claude.py")
    finally:
        shutil.rmtree(root, ignore_errors=True)


class UserSwarm(Swarm):
    """A Swarm whose supervisor and CLI run as ``USER`` with Debian's Python."""

    def __init__(self, home: Path, config: dict[str, Any], python: str) -> None:
        super().__init__(home, config)
        self.python = python
        self.account = pwd.getpwnam(USER)

    def env(self) -> dict[str, str]:
        return {"HOME": str(self.home), "USER": USER, "LOGNAME": USER, "PATH": "/usr/bin:/bin",
                "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"}

    def _as_user(self) -> dict[str, Any]:
        return {"user": self.account.pw_uid, "group": self.account.pw_gid, "extra_groups": [],
                "env": self.env(), "cwd": self.home}

    def write_config(self, config: dict[str, Any] | None = None) -> None:
        super().write_config(config)
        for path in (self.home, *self.home.rglob("*")):
            os.chown(path, self.account.pw_uid, self.account.pw_gid)

    def start(self, *args: str, wait_ready: bool = True, timeout: float = 30.0) -> "UserSwarm":
        self.home.mkdir(parents=True, exist_ok=True)
        self.write_config()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([self.python, "-m", "agentctl_swarm.cli", "swarm", "start", *args],
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         **self._as_user())
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def cli(self, *args: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([self.python, "-m", "agentctl_swarm.cli", *args], capture_output=True,
                                text=True, timeout=timeout, **self._as_user())
        if check and result.returncode != 0:
            raise SwarmError(f"agentctl {' '.join(args)} -> {result.returncode}: {result.stderr.strip()}")
        return result


@pytest.fixture
def user_home() -> Iterator[Path]:
    """A home for the user's swarm under /tmp (pytest's tmp_path is root-only)."""
    home = Path(tempfile.mkdtemp(prefix="agentctl-rlimit-home-"))
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


def user_config(python: str, fake: str, limit: str) -> dict[str, Any]:
    command = [python, fake, "-p", "--output-format", "stream-json", "--verbose"]
    return base_config(count=1, agent={"command": command, "memory-limit": limit})


def session_address_limit(swarm: Swarm, daemon: dict[str, Any]) -> int:
    """RLIMIT_AS of a running session's process (the fake's child), then cancel that task."""
    swarm.add_task("wait [fake:hang]", "probe")
    swarm.wait_tasks(["probe"], ("running",), timeout=TASK_TIMEOUT)
    pid_file = Path(daemon["workspace"]) / "fake-child.pid"
    swarm.wait_for(pid_file.exists, timeout=30, what="the session's child pid file")
    limits = Path(f"/proc/{pid_file.read_text().strip()}/limits").read_text()
    swarm.cli("task", "cancel", "probe")
    swarm.wait_tasks(["probe"], ("cancelled",), timeout=TASK_TIMEOUT)
    line = next(ln for ln in limits.splitlines() if ln.startswith("Max address space"))
    return int(line.split()[3])


def test_rlimit_session_over_the_limit_fails_oom_and_daemon_lives(
        user_python: tuple[str, str], user_home: Path) -> None:
    python, fake = user_python
    with UserSwarm(user_home, user_config(python, fake, "512M"), python) as swarm:
        snap = swarm.start(timeout=READY_TIMEOUT).status()
        sup = snap["supervisor"]
        assert sup["memory_enforcement"] == "rlimit", sup
        assert f"not writable by uid {pwd.getpwnam(USER).pw_uid}" in sup["memory_enforcement_detail"]
        daemon = agent(swarm)
        assert f"Uid:\t{pwd.getpwnam(USER).pw_uid}" in Path(f"/proc/{daemon['pid']}/status").read_text()
        assert session_address_limit(swarm, daemon) == 512 << 20

        swarm.add_task("grow [fake:alloc:700]", "big")
        task = swarm.wait_tasks(["big"], ("done", "failed"), timeout=TASK_TIMEOUT)["big"]
        assert (task["state"], task["reason"]) == ("failed", "oom"), task
        after = agent(swarm)
        assert (after["pid"], after["restarts"]) == (daemon["pid"], 0)

        swarm.add_task("small [fake:success]", "small")
        assert swarm.wait_tasks(["small"], timeout=TASK_TIMEOUT)["small"]["state"] == "done"
        assert swarm.stop() == 0


def test_rlimit_limit_below_the_daemons_own_size(user_python: tuple[str, str], user_home: Path) -> None:
    """RLIMIT_AS caps what the *session* may map. An idle daemon allocates nothing new, so no
    limit "kills" it under RLIMIT; but a limit below the daemon's own size (16 MiB here, the
    daemon maps ~40 MiB) must not break the daemon's handling of the next task: a small
    session still runs to DONE, and one that allocates past the limit fails as ``oom``."""
    python, fake = user_python
    with UserSwarm(user_home, user_config(python, fake, "16M"), python) as swarm:
        daemon = agent(swarm.start(timeout=READY_TIMEOUT))
        size = Path(f"/proc/{daemon['pid']}/status").read_text().split("VmSize:")[1].split()[0]
        assert int(size) * 1024 > 16 << 20, "the daemon is not bigger than the limit; lower it"
        swarm.add_task("small [fake:success]", "small")
        swarm.add_task("grow [fake:alloc:64]", "big")
        tasks = swarm.wait_tasks(["small", "big"], ("done", "failed"), timeout=TASK_TIMEOUT)
        outcomes = {i: (tasks[i]["state"], tasks[i]["reason"]) for i in ("small", "big")}
        assert outcomes == {"small": ("done", ""), "big": ("failed", "oom")}, outcomes
        assert (agent(swarm)["pid"], agent(swarm)["restarts"]) == (daemon["pid"], 0)
        assert swarm.stop() == 0


def test_killed_test_swarms_leave_no_user_process(user_python: tuple[str, str]) -> None:
    """Nothing of the user's swarms survives these tests."""
    uid = pwd.getpwnam(USER).pw_uid
    left = [p for p in os.listdir("/proc") if p.isdigit() and _owner(int(p)) == uid]
    if left:
        for pid in map(int, left):
            _kill(pid)
    assert left == [], f"processes of {USER} left behind: {left}"


def _owner(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
