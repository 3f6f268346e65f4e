"""Boot the machine's own OS under a real systemd in a systemd-nspawn container.

Design note
-----------
This machine has systemd 252 installed but not running as PID 1, so the unit
files cannot be exercised on the host.  The host's own tree boots fine as a
container::

    systemd-nspawn -D / --volatile=yes --register=no --keep-unit -M NAME \\
        --overlay=/etc:UPPER1:/etc --overlay=/root:UPPER2:/root \\
        --overlay=/usr:UPPER3:/usr --bind=CHECKOUT:/mnt/src -b

* ``--volatile=yes`` gives the container a tmpfs root; only /usr comes from the
  host.  The three overlays make /etc, /root and /usr writable inside with the
  writes landing in fresh temp dirs (the host is never modified), so
  ``useradd``, ``dpkg -i`` and ``pip install`` work and vanish at stop.
* ``--system-call-filter=landlock_*`` is added: nspawn 252's seccomp
  allow-list for the container predates Landlock, so without it every service
  would see EPERM from Landlock where a real host allows it.
* Two extra read-only binds are added: the host's dpkg database (the tmpfs root
  has none; ``dpkg -i`` of our .deb needs one, see :meth:`Container.seed_dpkg`)
  and an optional directory of build artefacts (the .deb).
* ``--register=no`` because there is no machined here; therefore ``machinectl``
  cannot reach the container and every command enters it with
  ``nsenter -t LEADER -a`` where LEADER is nspawn's child, the container's PID 1.
  Commands get a clean environment (``env -i``) so the host's pyenv PATH and pip
  settings do not leak in.
* The container's systemd runs its own journald, logind and per-user managers;
  ``loginctl enable-linger`` gives a user a ``user@UID.service`` without a login.

How the unprivileged user gets our Python: the host Python is pyenv under
/root/.pyenv, unreadable by other users.  :meth:`Container.install_project`
creates ``/opt/agentctl-venv`` inside the container from Debian's
/usr/bin/python3 with ``--system-site-packages --without-pip`` (so the Debian
packages python3-yaml, -psutil, -websockets, -cryptography, -sdnotify and
-systemd, installed on the host before boot and visible through /usr, are the
dependencies) and installs a copy of the checkout into it with Debian's own pip
(``--no-deps --no-build-isolation --no-index``, setuptools and wheel from
python3-setuptools/python3-wheel).  It takes about two seconds, needs no
network, and leaves the checkout untouched (the build runs on a copy in the
container's /tmp).  The .deb is the second path (tests/systemd/test_deb.py).

Nothing is left behind: the overlays live in the container's private mount
namespace and die with it, the upper dirs are removed at :meth:`Container.stop`,
and the empty directories nspawn creates under /run/systemd are removed when no
other container is running.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from pathlib import Path
from types import TracebackType

import psutil

log = logging.getLogger(__name__)

CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SRC_MOUNT = "/mnt/src"
HOST_DPKG_MOUNT = "/mnt/host-dpkg"
ARTIFACTS_MOUNT = "/mnt/artifacts"
VENV = "/opt/agentctl-venv"
PR_SET_PDEATHSIG = 1
# nspawn 252's seccomp allow-list predates Landlock: without this, every process
# the container's systemd starts gets EPERM from landlock_*, unlike on a host.
LANDLOCK_SYSCALLS = ("landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self")
# Directories systemd-nspawn creates on the host and does not remove.
NSPAWN_HOST_DIRS = ("/run/systemd/nspawn/propagate", "/run/systemd/nspawn", "/run/systemd/nspawn-root")


class ContainerError(RuntimeError):
    """The container could not be booted or a command inside it failed."""


class Container:
    """One booted systemd container over the host's own OS; see the module note."""

    def __init__(self, checkout: Path, *, name: str | None = None,
                 artifacts: Path | None = None, boot_timeout: float = 60.0) -> None:
        self.checkout = checkout.resolve()
        self.name = name or f"agentctl-test-{secrets.token_hex(4)}"
        self.artifacts = artifacts
        self.boot_timeout = boot_timeout
        self.workdir = Path(tempfile.mkdtemp(prefix="agentctl-nspawn-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader: int | None = None
        self._users: dict[str, list[str]] = {}
        self._host_dirs_before = {d for d in NSPAWN_HOST_DIRS if os.path.isdir(d)}

    # ----------------------------------------------------------------- boot

    def nspawn_argv(self) -> list[str]:
        """The exact command line of the issue, plus the read-only binds we need."""
        uppers = [self.workdir / f"upper-{n}" for n in ("etc", "root", "usr")]
        for upper in uppers:
            upper.mkdir()
        argv = ["systemd-nspawn", "-D", "/", "--volatile=yes", "--register=no",
                "--keep-unit", "-M", self.name,
                f"--overlay=/etc:{uppers[0]}:/etc", f"--overlay=/root:{uppers[1]}:/root",
                f"--overlay=/usr:{uppers[2]}:/usr", f"--bind={self.checkout}:{SRC_MOUNT}",
                f"--bind-ro=/var/lib/dpkg:{HOST_DPKG_MOUNT}",
                f"--system-call-filter={' '.join(LANDLOCK_SYSCALLS)}"]
        if self.artifacts is not None:
            argv.append(f"--bind-ro={self.artifacts.resolve()}:{ARTIFACTS_MOUNT}")
        return [*argv, "-b"]

    def start(self) -> None:
        """Boot in the background and wait until the container's systemd is up."""
        out = open(self.workdir / "console.log", "wb")  # noqa: SIM115 - owned by Popen
        err = open(self.workdir / "nspawn.err", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(self.nspawn_argv(), stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=err, start_new_session=True, preexec_fn=_term_with_parent)
        out.close()
        err.close()
        deadline = time.monotonic() + self.boot_timeout
        self.leader = self._wait_for_leader(deadline)
        self._wait_until_running(deadline)
        log.info("container %s up, leader %s", self.name, self.leader)

    def _wait_for_leader(self, deadline: float) -> int:
        """nspawn's child becomes the container's PID 1 once it execs systemd."""
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ContainerError(f"systemd-nspawn exited {self.proc.returncode}: {self.stderr_tail()}")
            with suppress(psutil.NoSuchProcess):
                for child in psutil.Process(self.proc.pid).children():
                    if child.name() == "systemd":
                        return child.pid
            time.sleep(0.05)
        raise ContainerError(f"container PID 1 did not appear: {self.stderr_tail()}")

    def _wait_until_running(self, deadline: float) -> None:
        """Poll ``is-system-running`` (it fails until the manager's bus is up)."""
        state = ""
        while time.monotonic() < deadline:
            result = self.run(["systemctl", "is-system-running", "--wait"], check=False,
                              timeout=max(1.0, deadline - time.monotonic()))
            state = result.stdout.strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.1)
        raise ContainerError(f"container systemd not up (state {state!r}): {self.stderr_tail()}")

    def stderr_tail(self, lines: int = 8) -> str:
        """The last lines nspawn wrote to stderr, for skip reasons and errors."""
        path = self.workdir / "nspawn.err"
        text = path.read_text(errors="replace") if path.exists() else ""
        return " | ".join(text.strip().splitlines()[-lines:]) or "(no stderr)"

    # ------------------------------------------------------------- commands

    def enter_argv(self, cmd: Sequence[str], user: str | None = None,
                   env: Mapping[str, str] | None = None) -> list[str]:
        """argv that runs ``cmd`` in the container, as root or as ``user``."""
        if self.leader is None:
            raise ContainerError("container is not running")
        base = {"PATH": CONTAINER_PATH, "LANG": "C.UTF-8"}
        if user is not None:
            uid = self.uid(user)
            base |= {"HOME": self.home(user), "USER": user, "LOGNAME": user,
                     "XDG_RUNTIME_DIR": f"/run/user/{uid}",
                     "DBUS_SESSION_BUS_ADDRESS": f"unix:path=/run/user/{uid}/bus"}
        base |= dict(env or {})
        envv = ["env", "-i", *(f"{k}={v}" for k, v in base.items())]
        prefix = ["nsenter", "-t", str(self.leader), "-a"]
        if user is None:
            return [*prefix, *envv, *cmd]
        return [*prefix, "runuser", "-u", user, "--", *envv, *cmd]

    def run(self, cmd: Sequence[str] | str, user: str | None = None, *, check: bool = True,
            timeout: float = 30.0, input: str | None = None,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` (argv, or a string for ``sh -c``) inside; text output captured."""
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        result = subprocess.run(self.enter_argv(argv, user, env), input=input, text=True,
                                capture_output=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise ContainerError(f"{shlex.join(argv)} (as {user or 'root'}) exited "
                                 f"{result.returncode}: {result.stderr.strip()[-2000:]}")
        return result

    def popen(self, cmd: Sequence[str], user: str | None = None) -> subprocess.Popen[str]:
        """Start ``cmd`` inside without waiting, e.g. ``journalctl -f``."""
        return subprocess.Popen(self.enter_argv(cmd, user), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def write_file(self, path: str, text: str, *, owner: str | None = None, mode: int = 0o644) -> None:
        """Write a file inside the container (parents created, owned by ``owner``)."""
        quoted = shlex.quote(path)
        self.run(f"mkdir -p $(dirname {quoted}) && cat > {quoted} && chmod {mode:o} {quoted}",
                 user=owner, input=text)

    def read_file(self, path: str) -> str:
        """Read a file inside the container, as root."""
        return self.run(["cat", path]).stdout

    # ---------------------------------------------------------------- users

    def add_user(self, name: str, timeout: float = 30.0) -> int:
        """Create ``name`` with a lingering user manager and wait until it runs."""
        self.run(["useradd", "-m", "-s", "/bin/bash", name])
        self.run(["loginctl", "enable-linger", name])
        uid = self.uid(name)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.user_systemctl("is-system-running", user=name, check=False).stdout.strip()
            if state in ("running", "degraded"):
                return uid
            time.sleep(0.1)
        raise ContainerError(f"user@{uid}.service of {name} did not start")

    def uid(self, user: str) -> int:
        """The UID of a user inside the container."""
        return int(self._passwd(user)[2])

    def home(self, user: str) -> str:
        """The home directory of a user inside the container."""
        return self._passwd(user)[5]

    def _passwd(self, user: str) -> list[str]:
        """The user's passwd entry (looked up once: users are never changed here)."""
        if user not in self._users:
            self._users[user] = self.run(["getent", "passwd", user]).stdout.strip().split(":")
        return self._users[user]

    def user_systemctl(self, *args: str, user: str = "swarm", check: bool = True,
                       timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``systemctl --user ARGS`` as ``user``."""
        return self.run(["systemctl", "--user", "--no-pager", *args], user=user,
                        check=check, timeout=timeout)

    def user_show(self, unit: str, *props: str, user: str = "swarm") -> dict[str, str]:
        """``systemctl --user show -p ...`` parsed into a dict."""
        args = [f"--property={p}" for p in props]
        out = self.user_systemctl("show", unit, *args, user=user).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def install_user_unit(self, name: str, text: str, user: str = "swarm") -> None:
        """Put a unit in the user's ~/.config/systemd/user and daemon-reload."""
        self.write_file(f"{self.home(user)}/.config/systemd/user/{name}", text, owner=user)
        self.user_systemctl("daemon-reload", user=user)

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``predicate`` every 50 ms until true; fail naming ``what``."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise ContainerError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(0.05)

    # -------------------------------------------------------------- journal

    def journal(self, unit: str, *matches: str, user_unit: bool = True,
                fields: Sequence[str] = ()) -> list[dict[str, object]]:
        """Journal entries of ``unit`` (a user unit unless ``user_unit=False``), as root.

        ``matches`` are extra ``FIELD=value`` filters (ANDed); ``fields`` limits
        the output fields.  ``journalctl --sync`` first, so recent lines are in.
        """
        self.run(["journalctl", "--sync"], check=False)
        key = "_SYSTEMD_USER_UNIT" if user_unit else "_SYSTEMD_UNIT"
        argv = ["journalctl", "--no-pager", "-o", "json", f"{key}={unit}", *matches]
        if fields:
            argv.append("--output-fields=" + ",".join(fields))
        out = self.run(argv).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def manager_journal(self, unit: str, *matches: str) -> list[dict[str, object]]:
        """What the user manager logged about ``unit`` (``USER_UNIT=``): starts, watchdog."""
        self.run(["journalctl", "--sync"], check=False)
        out = self.run(["journalctl", "--no-pager", "-o", "json", f"USER_UNIT={unit}", *matches]).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    # --------------------------------------------------------------- python

    def install_project(self) -> str:
        """Install the checkout into /opt/agentctl-venv; return its ``agentctl`` path."""
        script = (f"rm -rf {VENV} /tmp/agentctl-src && mkdir -p /tmp/agentctl-src && "
                  f"tar -C {SRC_MOUNT} --exclude=.git --exclude='*.egg-info' --exclude=__pycache__ "
                  "--exclude=build --exclude=.pytest_cache --exclude=.hypothesis -cf - . "
                  "| tar -C /tmp/agentctl-src -xf - && "
                  f"/usr/bin/python3 -m venv --system-site-packages --without-pip {VENV} && "
                  f"{VENV}/bin/python -m pip install -q --no-deps --no-build-isolation "
                  "--no-index --disable-pip-version-check /tmp/agentctl-src")
        self.run(script, timeout=120)
        return f"{VENV}/bin/agentctl"

    def seed_dpkg(self) -> None:
        """Copy the host's dpkg database into the tmpfs root so ``dpkg -i`` works."""
        self.run(f"mkdir -p /var/lib && cp -a {HOST_DPKG_MOUNT} /var/lib/dpkg", timeout=60)

    # ----------------------------------------------------------------- stop

    def stop(self, timeout: float = 20.0) -> None:
        """Power off (nsenter + systemctl poweroff), escalate to SIGKILL, clean up."""
        if self.proc is not None and self.proc.poll() is None:
            if self.leader is not None:
                self.run(["systemctl", "--no-block", "poweroff"], check=False, timeout=10)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("container %s did not power off in %ss: killing it", self.name, timeout)
                self._kill()
        self.leader = None
        shutil.rmtree(self.workdir, ignore_errors=True)
        self._remove_nspawn_host_dirs()

    def _kill(self) -> None:
        """SIGKILL PID 1 (ends the whole PID namespace), then nspawn itself."""
        assert self.proc is not None
        for pid in (self.leader, self.proc.pid):
            if pid is not None:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)

    def _remove_nspawn_host_dirs(self) -> None:
        """Remove the empty dirs nspawn made under /run/systemd, if no container uses them."""
        if any(p.info["name"] == "systemd-nspawn" for p in psutil.process_iter(["name"])):
            return
        for path in NSPAWN_HOST_DIRS:
            if path not in self._host_dirs_before:
                with suppress(OSError):
                    os.rmdir(path)

    def __enter__(self) -> "Container":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _term_with_parent() -> None:
    """In nspawn before exec: SIGTERM when the test process dies.

    nspawn turns SIGTERM into an orderly poweroff of the container, so a test
    run killed with SIGKILL still leaves no container behind.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def boot_problem() -> str | None:
    """Why a container cannot be booted here (None when it can be tried)."""
    if os.geteuid() != 0:
        return "systemd container tests need root (systemd-nspawn boots the host's OS)"
    for tool in ("systemd-nspawn", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian package systemd-container / util-linux)"
    if not os.path.exists("/usr/lib/systemd/systemd"):
        return "systemd is not installed on this machine"
    return None

