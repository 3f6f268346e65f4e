"""The peer: N bare Python children brought up by supervisord, timed the same way.

supervisord is installed from PyPI into the benchmark's own virtualenv (never
into the project's environment); if that cannot be done the peer is skipped with
the reason. Readiness is asked over supervisord's XML-RPC on its Unix socket
(stdlib ``xmlrpc.client`` over ``AF_UNIX``), which is what ``supervisorctl
status`` reads, without paying a Python start per poll.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from pathlib import Path

DEFAULT_VENV = Path(os.environ.get("AGENTCTL_BENCH_VENV", "/tmp/agentctl-swarm-bench-venv"))
BARE_CHILD = "import time; time.sleep(1e9)"
# The interpreter each peer's children run. "supervisord" uses the swarm's own
# interpreter binary (the fair comparison); "supervisord-python3" runs `python3`
# from PATH, as the reference figures did (here a pyenv shim, ~95 ms a start).
PEER_PYTHON = {"supervisord": sys.executable, "supervisord-python3": shutil.which("python3")}


class PeerUnavailable(Exception):
    """supervisord cannot be installed or started here; the message says why."""


def ensure_venv(venv: Path = DEFAULT_VENV, packages: tuple[str, ...] = ("supervisor",)) -> Path:
    """Create the benchmark venv and pip-install ``packages`` into it; return its bin dir."""
    bindir = venv / "bin"
    missing = [p for p in packages if not _installed(bindir, p)]
    if not missing:
        return bindir
    try:
        if not (bindir / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True,
                           capture_output=True, timeout=120)
        subprocess.run([str(bindir / "pip"), "install", "-q", *missing], check=True,
                       capture_output=True, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        raise PeerUnavailable(f"cannot install {' '.join(missing)} into {venv}: {exc} "
                              f"{detail.decode(errors='replace')[-300:]}") from None
    return bindir


def _installed(bindir: Path, package: str) -> bool:
    exe = {"supervisor": "supervisord", "py-spy": "py-spy"}.get(package, package)
    return (bindir / exe).exists()


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


class _UnixTransport(xmlrpc.client.Transport):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def make_connection(self, host: str) -> http.client.HTTPConnection:  # type: ignore[override]
        return _UnixHTTPConnection(self.path)


def _config(workdir: Path, count: int, python: str) -> str:
    sock = workdir / "supervisor.sock"
    return f"""\
[unix_http_server]
file={sock}
chmod=0700

[supervisord]
nodaemon=true
logfile={workdir}/supervisord.log
pidfile={workdir}/supervisord.pid
childlogdir={workdir}
minfds=4096

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{sock}

[program:bare]
command={python} -c "{BARE_CHILD}"
process_name=%(program_name)s_%(process_num)04d
numprocs={count}
startsecs=0
autorestart=false
stdout_logfile=NONE
stderr_logfile=NONE
"""


def run_peer(bindir: Path, count: int, python: str = sys.executable,
             timeout: float = 300.0) -> dict[str, float]:
    """Start supervisord with ``count`` bare ``python -c`` children; seconds to all
    RUNNING, and memory."""
    with tempfile.TemporaryDirectory(prefix="bench-supervisord-") as tmp:
        workdir = Path(tmp)
        conf = workdir / "supervisord.conf"
        conf.write_text(_config(workdir, count, python))
        start = time.monotonic()
        proc = subprocess.Popen([str(bindir / "supervisord"), "-c", str(conf)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            pids = _wait_running(workdir / "supervisor.sock", count, start + timeout, proc)
            ready = time.monotonic() - start
            from swarm_bench import memory_of  # the same reader as for the swarm
            mem = memory_of(pids)
            return {"ready_s": ready, **mem}
        finally:
            _stop(proc)


def _wait_running(sock: Path, count: int, deadline: float, proc: subprocess.Popen) -> list[int]:
    server = xmlrpc.client.ServerProxy("http://localhost", transport=_UnixTransport(str(sock)))
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PeerUnavailable(f"supervisord exited with {proc.returncode}")
        try:
            infos = server.supervisor.getAllProcessInfo()
        except (OSError, xmlrpc.client.Fault, http.client.HTTPException):
            time.sleep(0.05)
            continue
        running = [i["pid"] for i in infos if i["statename"] == "RUNNING"]
        if len(running) >= count:
            return running
        time.sleep(0.05)
    raise PeerUnavailable(f"supervisord did not bring {count} children to RUNNING in time")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM supervisord (it stops its children), then make sure the group is gone."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if proc.poll() is None:
        proc.wait(10)
