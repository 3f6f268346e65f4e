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
# A bare child says it is up by writing one byte to the benchmark's FIFO (``os`` is
# imported at every interpreter start, so this adds no import), then sleeps.
BARE_CHILD = "import os, time; os.write(os.open('{fifo}', os.O_WRONLY), b'.'); time.sleep(1e9)"


def login_shell_python3() -> str | None:
    """``python3`` as a user's login shell finds it (here a pyenv shim, ~95 ms a start).

    Not ``shutil.which``: under pyenv this process's own PATH starts with the
    interpreter's bin directory, which pyenv's shim put there."""
    try:
        out = subprocess.run(["bash", "-lc", "command -v python3"], capture_output=True,
                             text=True, timeout=30, env={"HOME": os.environ.get("HOME", "/")})
        found = out.stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        found = []
    return found[-1] if found else shutil.which("python3")


# The interpreter each peer's children run. "supervisord" uses the swarm's own
# interpreter binary (the fair comparison); "supervisord-python3" runs `python3`
# as a login shell finds it, as the reference figures did.
PEER_PYTHON = {"supervisord": lambda: sys.executable, "supervisord-python3": login_shell_python3}


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
command={python} -c "{BARE_CHILD.format(fifo=workdir / 'up.fifo')}"
process_name=%(program_name)s_%(process_num)04d
numprocs={count}
startsecs=0
autorestart=false
stdout_logfile=NONE
stderr_logfile=NONE
"""


def run_peer(bindir: Path, count: int, python: str = sys.executable,
             timeout: float = 300.0) -> dict[str, float]:
    """Start supervisord with ``count`` bare ``python -c`` children.

    ``ready_s``: seconds until all ``count`` children run their code (each writes a
    byte to a FIFO), as a daemon is ready when it runs and heartbeats.
    ``running_s``: seconds until supervisord reports all RUNNING, which with
    ``startsecs=0`` is as soon as it has spawned them, before their interpreter
    has started. Also their memory."""
    with tempfile.TemporaryDirectory(prefix="bench-supervisord-") as tmp:
        workdir = Path(tmp)
        fifo = workdir / "up.fifo"
        os.mkfifo(fifo)
        reader = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # RDWR: never EOF, never blocks a writer
        conf = workdir / "supervisord.conf"
        conf.write_text(_config(workdir, count, python))
        start = time.monotonic()
        proc = subprocess.Popen([str(bindir / "supervisord"), "-c", str(conf)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            pids = _wait_running(workdir / "supervisor.sock", count, start + timeout, proc)
            running = time.monotonic() - start
            _wait_up(reader, count, start + timeout)
            ready = time.monotonic() - start
            from swarm_bench import memory_of  # the same reader as for the swarm
            mem = memory_of(pids)
            return {"ready_s": ready, "running_s": running, **mem}
        finally:
            os.close(reader)
            _stop(proc)


def _wait_up(reader: int, count: int, deadline: float) -> None:
    """Until ``count`` bytes (one per child) have come through the FIFO."""
    import select
    seen = 0
    while seen < count:
        left = deadline - time.monotonic()
        if left <= 0:
            raise PeerUnavailable(f"only {seen}/{count} bare children started in time")
        if select.select([reader], [], [], min(left, 1.0))[0]:
            try:
                seen += len(os.read(reader, 65536))
            except BlockingIOError:
                pass


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
