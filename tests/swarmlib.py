"""Drive a real swarm from tests, the soak and the benchmarks.

``Swarm`` runs ``agentctl swarm start`` as a real child process with its own
``HOME`` (so its state, logs, control socket and workspaces are private to the
test) and talks to it with the real CLI over the real control socket.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml

ROOT = Path(__file__).resolve().parent.parent
FAKE_CLAUDE = ROOT / "tests" / "fakes" / "fake_claude.py"
AGENTCTL = [sys.executable, "-m", "agentctl_swarm.cli"]


def start_relay(port_file: Path, *more: str) -> subprocess.Popen[bytes]:
    """A relay process of our own (not a supervisor's embedded one), on a free loopback
    port written to ``port_file``; ``more``: further relay arguments. The caller stops it."""
    port_file.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "agentctl_swarm.agentchat.relay", "--rate-limit", "0",
                             "--port-file", str(port_file), *more], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not port_file.exists():
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "relay exited"
        assert time.monotonic() < deadline, "the relay never wrote its port"
        time.sleep(0.02)
    return proc


def fake_agent_command() -> list[str]:
    return [sys.executable, str(FAKE_CLAUDE), "-p", "--output-format", "stream-json", "--verbose"]


def base_config(**overrides: Any) -> dict[str, Any]:
    """A config for tests: fake claude, fast relay, short heartbeats."""
    config: dict[str, Any] = {
        "count": 3,
        "heartbeat-interval": "2s",
        "agentchat": {"rate-limit": 50},
        "agent": {"command": fake_agent_command()},
        "status-interval": "1s",
        "shutdown-grace": "3s",
    }
    for key, value in overrides.items():
        key = key.replace("_", "-")
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


class SwarmError(AssertionError):
    pass


class Swarm:
    """One supervisor process under test."""

    def __init__(self, home: Path, config: dict[str, Any] | None = None,
                 extra_env: dict[str, str] | None = None) -> None:
        self.home = Path(home)
        self.config = base_config() if config is None else config
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.home / "supervisor.stderr"

    @property
    def config_path(self) -> Path:
        return self.home / ".agentctl" / "swarm.yaml"

    @property
    def state_dir(self) -> Path:
        return self.home / ".agentctl" / "state"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "INVOCATION_ID",
                            "JOURNAL_STREAM", "CLAUDECODE")}
        # Run the code of this checkout, whatever copy is installed.
        env.update(HOME=str(self.home), PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT), **self.extra_env)
        return env

    def write_config(self, config: dict[str, Any] | None = None) -> None:
        if config is not None:
            self.config = config
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config))

    def start(self, *args: str, wait_ready: bool = True, timeout: float = 30.0) -> "Swarm":
        self.home.mkdir(parents=True, exist_ok=True)
        self.write_config()
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([*AGENTCTL, "swarm", "start", *args], env=self.env(),
                                     stdout=log, stderr=subprocess.STDOUT, cwd=self.home,
                                     start_new_session=True)
        log.close()
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def cli(self, *args: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*AGENTCTL, *args], env=self.env(), capture_output=True, text=True,
                                timeout=timeout, cwd=self.home)
        if check and result.returncode != 0:
            raise SwarmError(f"agentctl {' '.join(args)} -> {result.returncode}: {result.stderr.strip()}")
        return result

    def status(self) -> dict[str, Any]:
        return json.loads(self.cli("swarm", "status", "--json").stdout)

    def tasks(self, include_archived: bool = False) -> dict[str, dict[str, Any]]:
        args = ("task", "list", "--json") + (("--all",) if include_archived else ())
        return {t["id"]: t for t in json.loads(self.cli(*args).stdout)}

    def agents(self) -> dict[str, dict[str, Any]]:
        return {a["name"]: a for a in self.status()["agents"]}

    def add_task(self, prompt: str, task_id: str, role: str = "any") -> None:
        self.cli("task", "add", prompt, "--id", task_id, "--role", role)

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition",
                 interval: float = 0.1) -> Any:
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                value = predicate()
                if value:
                    return value
                last_error = None  # the question was answered, just not yet as hoped
            except (SwarmError, subprocess.TimeoutExpired, ValueError, KeyError) as exc:
                last_error = exc
            time.sleep(interval)
        raise SwarmError(f"timed out after {timeout}s waiting for {what}"
                         + (f" (last error: {last_error})" if last_error else "") + self.sockets() + self.tail())

    def sockets(self) -> str:
        """Which process listens on the control socket, and on which inode (failure diagnostics)."""
        sock = self.home / ".agentctl" / "run" / "control.sock"
        try:
            st = os.stat(sock)
            inode = f"{st.st_ino} ctime {time.strftime('%H:%M:%S', time.localtime(st.st_ctime))}" \
                f".{int(st.st_ctime % 1 * 1000):03d}"
        except OSError as exc:
            inode = f"none ({exc.strerror})"
        listening = subprocess.run(["ss", "-xlpn"], capture_output=True, text=True).stdout
        lines = [line for line in listening.splitlines() if str(self.home) in line]
        for pid in {int(p) for p in __import__("re").findall(r"pid=(\d+)", " ".join(lines))}:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
                lines.append(f"pid {pid}: {cmd} (supervisor under test: {self.proc.pid if self.proc else None})")
            except OSError:
                pass
        bound = [line.split() for line in Path("/proc/net/unix").read_text().splitlines()
                 if line.endswith(str(sock))]
        owners = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                for fd in (entry / "fd").iterdir():
                    target = os.readlink(fd)
                    if any(target == f"socket:[{b[6]}]" for b in bound):
                        owners[target] = f"pid {entry.name} {(entry / 'comm').read_text().strip()}"
            except OSError:
                continue
        import socket as _socket
        probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        probe.settimeout(5)
        try:
            probe.connect(str(sock))
            direct = "direct connect ok"
        except OSError as exc:
            direct = f"direct connect: {exc!r}"
        finally:
            probe.close()
        cli = self.cli("swarm", "status", "--json", check=False)
        direct += f"; cli now: {cli.returncode} {cli.stderr.strip()[-60:]}"
        return (f"\n--- {direct}; control socket inode {inode}; listeners: {lines}; bound to the path: "
                f"{[(b[6], 'state ' + b[5]) for b in bound]}; owners {owners}")

    def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            snap = self.status()
            agents = snap["agents"]
            ok = snap["supervisor"]["ready"] and len(agents) == snap["supervisor"]["desired"] and \
                all(a["connected"] and a["status"] == "idle" for a in agents)
            return snap if ok else None
        return self.wait_for(ready, timeout, "the swarm to be ready")

    def wait_tasks(self, ids: list[str], states: tuple[str, ...] = ("done",), timeout: float = 60.0) -> dict[str, Any]:
        def settled() -> dict[str, Any] | None:
            tasks = self.tasks()
            return tasks if all(tasks.get(i, {}).get("state") in states for i in ids) else None
        return self.wait_for(settled, timeout, f"tasks {ids} to reach {states}", interval=0.2)

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise SwarmError(f"supervisor exited with {self.proc.returncode}" + self.tail())

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "\n--- supervisor output ---\n" + "\n".join(text)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM the supervisor and wait; returns its exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise SwarmError("supervisor did not stop within the timeout" + self.tail())

    def kill(self) -> None:
        """SIGKILL the supervisor (as a crash would); its daemons must die with it."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> "Swarm":
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.stop()
        finally:
            self.kill()


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for a reaper that is not ours)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def swarm_processes(home: Path) -> list[int]:
    """PIDs whose environment or command line mentions this swarm's HOME (leak check)."""
    found = []
    marker = str(home).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid() or not alive(int(entry.name)):
            continue
        try:
            if marker in (entry / "environ").read_bytes() or marker in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found
