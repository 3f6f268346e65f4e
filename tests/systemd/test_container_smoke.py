"""The harness and the unit's hardening, proven with a stand-in service.

The stand-in (fixtures/notify_standin.py) runs under the real user unit
systemd/agentctl-swarm.service with only ExecStart, WatchdogSec and RestartSec
changed, so these tests also show that the unit's sandboxing leaves the
supervisor what it needs (``test_hardening_leaves_what_the_supervisor_needs``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.systemd.harness import Container

UNIT = "agentctl-standin.service"
AGENT = "standin-007"
UNIT_DIR = Path(__file__).resolve().parents[2] / "systemd"
REAL_UNIT = UNIT_DIR / "agentctl-swarm.service"
REAL_TEMPLATE = UNIT_DIR / "agentctl-swarm@.service"
MAX_EXPOSURE = 4.0  # systemd-analyze security; docs/systemd.md records the figures
STANDIN = "/mnt/src/tests/systemd/fixtures/notify_standin.py"
READY_DELAY = 1.0


def standin_unit_text(real: Path = REAL_UNIT, agent: str = AGENT) -> str:
    """A real unit file with the stand-in as ExecStart and short timers."""
    text = real.read_text()
    replacements = {
        "ExecStart": f"/usr/bin/python3 {STANDIN} --probe --ready-delay {READY_DELAY} --agent-name {agent}",
        "WatchdogSec": "2s",
        "RestartSec": "200ms",
    }
    for key, value in replacements.items():
        text, count = re.subn(rf"^{key}=.*$", f"{key}={value}", text, flags=re.MULTILINE)
        assert count == 1, f"{real} must have exactly one {key}= line"
    return text


def exposure(container: Container, unit: str, user: str | None = None) -> float:
    """The overall exposure figure of ``systemd-analyze security`` for a loaded unit."""
    argv = ["systemd-analyze", "security", "--no-pager", *(["--user"] if user else []), unit]
    out = container.run(argv, user=user, check=False).stdout
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out)
    assert found, out[-500:]
    return float(found.group(1))


@pytest.fixture(scope="module")
def started(container: Container, swarm_user: str) -> Iterator[dict[str, float]]:
    """Install and start the stand-in; yield when ``start`` was called and returned."""
    container.install_user_unit(UNIT, standin_unit_text(), user=swarm_user)
    called = time.time()
    container.user_systemctl("start", UNIT, user=swarm_user)
    returned = time.time()
    yield {"called": called, "returned": returned}
    container.user_systemctl("stop", UNIT, user=swarm_user, check=False)


def events(container: Container, event: str) -> list[dict[str, object]]:
    """The stand-in's journal entries with EVENT=event."""
    return container.journal(UNIT, f"AGENT_NAME={AGENT}", f"EVENT={event}")


def test_start_returns_only_after_ready(container: Container, started: dict[str, float]) -> None:
    assert started["returned"] - started["called"] >= READY_DELAY * 0.9
    state = container.user_show(UNIT, "ActiveState", "SubState")
    assert state == {"ActiveState": "active", "SubState": "running"}
    ready = events(container, "ready")
    assert ready, "the stand-in logged no ready event"
    ready_at = int(str(ready[-1]["__REALTIME_TIMESTAMP"])) / 1e6
    assert ready_at <= started["returned"]


def test_status_shows_the_status_line(container: Container, started: dict[str, float]) -> None:
    out = container.user_systemctl("status", UNIT, check=False).stdout
    assert f'Status: "{AGENT} ready, reloads 0"' in out


def test_reload_goes_through_reloading_and_ready(container: Container, started: dict[str, float]) -> None:
    pid = container.user_show(UNIT, "MainPID")["MainPID"]
    container.user_systemctl("reload", UNIT)
    container.wait_for(lambda: container.user_show(UNIT, "StatusText")["StatusText"].endswith("reloads 1"),
                       timeout=5, what="STATUS after reload")
    assert container.user_show(UNIT, "MainPID", "ActiveState") == {"MainPID": pid, "ActiveState": "active"}
    assert events(container, "reload")


def test_user_unit_exposure_is_low(container: Container, swarm_user: str,
                                   started: dict[str, float]) -> None:
    score = exposure(container, UNIT, user=swarm_user)
    print(f"systemd-analyze security --user: {score}")
    assert score <= MAX_EXPOSURE


def test_journal_entries_are_selectable_by_agent_name(container: Container,
                                                      started: dict[str, float]) -> None:
    mine = container.journal(UNIT, f"AGENT_NAME={AGENT}")
    assert {e["EVENT"] for e in mine if "EVENT" in e} >= {"start", "ready"}
    assert all(e["AGENT_NAME"] == AGENT for e in mine)
    assert container.journal(UNIT, "AGENT_NAME=standin-999") == []


def probe_results(container: Container) -> dict[str, str]:
    """PROBE -> PROBE_RESULT as logged by the stand-in (the latest run wins)."""
    return {str(e["PROBE"]): str(e["PROBE_RESULT"]) for e in container.journal(UNIT) if "PROBE" in e}


def test_hardening_leaves_what_the_supervisor_needs(container: Container,
                                                     started: dict[str, float]) -> None:
    results = probe_results(container)
    expected = {"write-agentctl", "write-workspace", "write-tmp", "git", "cgroup-delegation",
                "bwrap", "landlock"}
    assert set(results) == expected
    failed = {name: result for name, result in results.items() if result != "ok"}
    assert not failed, f"the hardened unit blocks: {failed}"


def test_delegated_subtree_is_owned_by_the_user(container: Container, swarm_user: str,
                                                 started: dict[str, float]) -> None:
    """Delegate=yes hands the user a v2 subtree; report which controllers it has."""
    cgroup = container.user_show(UNIT, "ControlGroup")["ControlGroup"]
    root = "/sys/fs/cgroup/unified" if container.run(
        ["test", "-d", "/sys/fs/cgroup/unified"], check=False).returncode == 0 else "/sys/fs/cgroup"
    owner = container.run(["stat", "-c", "%U", f"{root}{cgroup}"]).stdout.strip()
    assert owner == swarm_user
    controllers = container.read_file(f"{root}{cgroup}/cgroup.controllers").split()
    has_memory_max = container.run(["test", "-e", f"{root}{cgroup}/memory.max"], check=False).returncode == 0
    assert ("memory" in controllers) == has_memory_max
    print(f"delegated {cgroup}: controllers={controllers or 'none'}")


def test_watchdog_kills_a_stopped_service_and_restarts_it(container: Container,
                                                           started: dict[str, float]) -> None:
    before = container.user_show(UNIT, "MainPID", "NRestarts")
    container.run(["kill", "-STOP", before["MainPID"]])

    def restarted() -> bool:
        now = container.user_show(UNIT, "MainPID", "NRestarts", "ActiveState")
        return (int(now["NRestarts"]) > int(before["NRestarts"]) and now["ActiveState"] == "active"
                and now["MainPID"] not in ("0", before["MainPID"]))

    container.wait_for(restarted, timeout=15, what="watchdog restart")
    gone = container.run(["kill", "-0", before["MainPID"]], check=False)
    assert gone.returncode != 0, "the stopped process survived the watchdog"
    said = [str(e.get("MESSAGE", "")) for e in container.manager_journal(UNIT)]
    assert any("Watchdog timeout" in line for line in said), said[-10:]


def test_system_template_runs_hardened_as_the_user(container: Container, swarm_user: str) -> None:
    """agentctl-swarm@.service: User=%i, same dialogue, same needs met, low exposure."""
    unit = f"agentctl-standin@{swarm_user}.service"
    container.write_file("/etc/systemd/system/agentctl-standin@.service",
                         standin_unit_text(REAL_TEMPLATE, agent="sys-007"))
    container.run(["systemctl", "daemon-reload"])
    try:
        container.run(["systemctl", "start", unit])
        container.run(["systemctl", "reload", unit])
        shown = container.run(["systemctl", "show", unit, "-p", "MainPID", "-p", "StatusText"]).stdout
        props = dict(line.split("=", 1) for line in shown.splitlines())
        assert props["StatusText"] == "sys-007 ready, reloads 1"
        assert container.run(["ps", "-o", "user=", "-p", props["MainPID"]]).stdout.strip() == swarm_user
        results = {str(e["PROBE"]): str(e["PROBE_RESULT"])
                   for e in container.journal(unit, user_unit=False) if "PROBE" in e}
        assert results and all(r == "ok" for r in results.values()), results
        score = exposure(container, unit)
        print(f"systemd-analyze security (system template): {score}")
        assert score <= MAX_EXPOSURE
    finally:
        container.run(["systemctl", "stop", unit], check=False)


def test_project_venv_serves_the_user(container: Container, swarm_user: str, agentctl_venv: str) -> None:
    """install_project(): the checkout in a venv over Debian's python3 and packages."""
    done = container.run([agentctl_venv, "--help"], user=swarm_user)
    assert "swarm" in done.stdout
    python = str(Path(agentctl_venv).parent / "python")
    where = container.run([python, "-c", "import agentctl_swarm, websockets; "
                           "print(agentctl_swarm.__file__, websockets.__file__)"], user=swarm_user).stdout.split()
    assert where[0].startswith("/opt/agentctl-venv/lib/")
    assert where[1].startswith("/usr/lib/python3/dist-packages/")
