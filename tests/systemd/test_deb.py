"""The Debian package: it builds, lintian finds no error, it installs into the
container, ``agentctl`` runs, both units are found, and the user unit starts.

The .deb is built on the host by debian/build-deb.sh (from a copy of the tree)
into the container's artefacts directory, bound read-only at /mnt/artifacts.
The container's tmpfs root has no dpkg database, so the host's is copied in
first (:meth:`Container.seed_dpkg`); the dependencies (python3-yaml, -psutil,
-websockets, -cryptography, -sdnotify, -systemd) must be installed on the host
before boot, as /usr is the host's.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.systemd.harness import ARTIFACTS_MOUNT, Container

CHECKOUT = Path(__file__).resolve().parents[2]
BUILD_TOOLS = ("dpkg-buildpackage", "dh", "dh_python3")
PYBUILD_PYPROJECT = Path("/usr/share/dh-python/dhpython/build/plugin_pyproject.py")
SWARM_CONFIG = "count: 2\n"


def build_problem() -> str | None:
    """Why the .deb cannot be built here (None when it can)."""
    missing = [tool for tool in BUILD_TOOLS if shutil.which(tool, path="/usr/bin:/bin") is None]
    if missing or not PYBUILD_PYPROJECT.exists():
        return ("Debian build tools missing (apt-get install debhelper dh-python "
                "pybuild-plugin-pyproject python3-all python3-setuptools)")
    return None


@pytest.fixture(scope="module")
def deb(container: Container) -> Path:
    """Build the .deb into the directory the container sees at /mnt/artifacts."""
    problem = build_problem()
    if problem is not None:
        pytest.skip(problem)
    assert container.artifacts is not None
    done = subprocess.run([str(CHECKOUT / "debian" / "build-deb.sh"), str(container.artifacts)],
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LINTIAN": "0"},
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def installed(container: Container, swarm_user: str, deb: Path) -> str:
    """dpkg -i the package inside; return the user who will run it."""
    container.seed_dpkg()
    container.run(["dpkg", "-i", f"{ARTIFACTS_MOUNT}/{deb.name}"], timeout=120)
    container.user_systemctl("daemon-reload", user=swarm_user)
    return swarm_user


def test_lintian_reports_no_errors(deb: Path) -> None:
    if shutil.which("lintian") is None:
        pytest.skip("lintian is not installed (apt-get install lintian)")
    done = subprocess.run(["lintian", "--fail-on", "error", str(deb)], capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not [line for line in done.stdout.splitlines() if line.startswith("E:")]


def test_package_status_and_files(container: Container, installed: str) -> None:
    status = container.run(["dpkg-query", "-W", "-f=${Status}", "agentctl-swarm"]).stdout
    assert status == "install ok installed"
    files = container.run(["dpkg", "-L", "agentctl-swarm"]).stdout.split()
    for path in ("/usr/bin/agentctl", "/usr/lib/systemd/user/agentctl-swarm.service",
                 "/usr/lib/systemd/system/agentctl-swarm@.service"):
        assert path in files


def test_agentctl_runs_as_the_user(container: Container, installed: str) -> None:
    done = container.run(["/usr/bin/agentctl", "--help"], user=installed)
    assert "swarm" in done.stdout
    where = container.run(["/usr/bin/python3", "-c", "import agentctl_swarm; print(agentctl_swarm.__file__)"],
                          user=installed).stdout
    assert where.startswith("/usr/lib/python3/dist-packages/agentctl_swarm/")


def test_user_unit_is_found_and_verifies(container: Container, installed: str) -> None:
    shown = container.user_systemctl("cat", "agentctl-swarm", user=installed).stdout
    assert "# /usr/lib/systemd/user/agentctl-swarm.service" in shown
    assert "ExecStart=/usr/bin/agentctl swarm start" in shown
    verify = container.run(["systemd-analyze", "verify", "--user",
                            "/usr/lib/systemd/user/agentctl-swarm.service"], user=installed, check=False)
    assert verify.returncode == 0, verify.stderr


def test_system_template_is_found(container: Container, installed: str) -> None:
    shown = container.run(["systemctl", "cat", f"agentctl-swarm@{installed}.service"]).stdout
    # Merged /usr: systemd may name it by its /lib path.
    assert re.search(r"^# (/usr)?/lib/systemd/system/agentctl-swarm@\.service$", shown, re.MULTILINE)
    assert container.run(["systemd-analyze", "verify", f"agentctl-swarm@{installed}.service"],
                         check=False).returncode == 0


def test_installed_user_unit_starts_and_stops(container: Container, installed: str) -> None:
    """The packaged unit, unchanged: start returns after READY, stop leaves nothing."""
    unit = "agentctl-swarm.service"
    home = container.home(installed)
    container.write_file(f"{home}/.agentctl/swarm.yaml", SWARM_CONFIG, owner=installed)
    started = container.user_systemctl("start", unit, user=installed, check=False, timeout=150)
    journal = "\n".join(str(e.get("MESSAGE", "")) for e in container.journal(unit)[-30:])
    try:
        assert started.returncode == 0, f"{started.stderr}\n{journal}"
        state = container.user_show(unit, "ActiveState", "StatusText", "MainPID", user=installed)
        assert state["ActiveState"] == "active", journal
        assert state["StatusText"], "the supervisor sent no STATUS="
    finally:
        container.user_systemctl("stop", unit, user=installed, check=False, timeout=60)
    after = container.user_show(unit, "ActiveState", user=installed)
    assert after["ActiveState"] in ("inactive", "failed")
    left = container.run(["pgrep", "-u", installed, "-f", "agentctl"], check=False).stdout
    assert left == "", f"processes left after stop: {left}"
