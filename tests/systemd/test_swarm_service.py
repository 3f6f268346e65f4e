"""The real supervisor as a systemd user service, under a real systemd in a container.

The user ``swarm`` runs ``agentctl-swarm.service`` as ``agentctl swarm
install-unit`` writes it for the project's venv (tests/systemd/harness.py,
``install_project``), with one drop-in for fast timers (``WatchdogSec=3s``,
``RestartSec=200ms``) and the fake claude CLI as ``agent.command``.  One
service is started for the whole module; the tests run in file order and the
last one stops it.

The container's root is a tmpfs, so journald keeps only a runtime journal,
which it never splits per user: a user could not read their own service's log.
The fixture makes the journal persistent (``/var/log/journal``, as on an
installed Debian 12), which gives the user a ``user-UID.journal`` of their own.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentctl_swarm.unit import unit_text
from tests.systemd.harness import Container, ContainerError

UNIT = "agentctl-swarm.service"
CHECKOUT = Path(__file__).resolve().parents[2]
FAKE_AGENT = "fake_claude.py"
COUNT = 2
GRACE_S = 3.0
MEMORY_LIMIT = "512M"
WATCHDOG_S = 3.0
DROP_IN = f"[Service]\nWatchdogSec={WATCHDOG_S:g}s\nRestartSec=200ms\n"
FIRST = "swarm-general-001"
SECOND = "swarm-general-002"

# Every process inside the container as [pid, starttime, uid, cgroup, cmdline]; run as root.
PROC_WALK = r"""
import json, os
out = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        stat = open(f"/proc/{pid}/stat").read()
        uid = int(open(f"/proc/{pid}/status").read().split("\nUid:")[1].split()[0])
        cgroup = open(f"/proc/{pid}/cgroup").read()
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, IndexError):
        continue
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] not in ("Z", "X"):
        out.append([int(pid), int(fields[19]), uid, cgroup, cmd.strip()])
print(json.dumps(out))
"""


def swarm_config(python: str, home: str, **extra: Any) -> str:
    """swarm.yaml for the user: the fake agent, short heartbeats, a memory limit."""
    config: dict[str, Any] = {
        "count": COUNT, "heartbeat-interval": "1s", "status-interval": "1s",
        "shutdown-grace": f"{GRACE_S:g}s", "start-timeout": "60s",
        "agentchat": {"rate-limit": 50},
        "agent": {"command": [python, f"{home}/{FAKE_AGENT}", "-p", "--output-format", "stream-json",
                              "--verbose"], "memory-limit": MEMORY_LIMIT},
    }
    config.update(extra)
    return json.dumps(config, indent=1)  # JSON is YAML


class Service:
    """The user's service and the CLI that talks to it, both inside the container."""

    def __init__(self, box: Container, user: str, agentctl: str) -> None:
        self.box, self.user, self.agentctl = box, user, agentctl
        self.home = box.home(user)
        self.python = str(Path(agentctl).parent / "python")
        self.config_path = f"{self.home}/.agentctl/swarm.yaml"
        self.unit_dir = f"{self.home}/.config/systemd/user"
        self.install_unit_error = ""
        self.started: dict[str, Any] = {}  # what was seen as `systemctl start` returned

    def cli(self, *args: str, check: bool = True, timeout: float = 30.0) -> str:
        return self.box.run([self.agentctl, *args], user=self.user, check=check, timeout=timeout).stdout

    def status(self) -> dict[str, Any]:
        return json.loads(self.cli("swarm", "status", "--json"))

    def pids(self) -> dict[str, int | None]:
        return {a["name"]: a["pid"] for a in self.status()["agents"]}

    def show(self, *props: str) -> dict[str, str]:
        return self.box.user_show(UNIT, *props, user=self.user)

    def systemctl(self, *args: str, check: bool = True, timeout: float = 60.0) -> str:
        return self.box.user_systemctl(*args, user=self.user, check=check, timeout=timeout).stdout

    def write_config(self, text: str) -> None:
        self.box.write_file(self.config_path, text, owner=self.user, mode=0o600)

    def config(self, **extra: Any) -> str:
        return swarm_config(self.python, self.home, **extra)

    def messages(self, *matches: str) -> list[dict[str, object]]:
        return self.box.journal(UNIT, *matches)

    def tasks(self) -> dict[str, dict[str, Any]]:
        return {t["id"]: t for t in json.loads(self.cli("task", "list", "--json"))}

    def wait_task(self, task_id: str, states: tuple[str, ...], timeout: float = 20.0) -> dict[str, Any]:
        found: dict[str, Any] = {}

        def settled() -> bool:
            found.update(self.tasks().get(task_id, {}))
            return found.get("state") in states
        self.box.wait_for(settled, timeout, f"task {task_id} to reach {states} (last: {found})")
        return found

    def install(self) -> None:
        """The unit as ``agentctl swarm install-unit`` writes it (see test_install_unit)."""
        self.box.run(["rm", "-rf", f"{self.unit_dir}/{UNIT}", f"{self.unit_dir}/{UNIT}.d"])
        try:
            self.cli("swarm", "install-unit")
        except ContainerError as exc:
            self.install_unit_error = str(exc)
            self.box.write_file(f"{self.unit_dir}/{UNIT}", unit_text(self.python), owner=self.user)
        self.box.write_file(f"{self.unit_dir}/{UNIT}.d/test-timers.conf", DROP_IN, owner=self.user)
        self.systemctl("daemon-reload")
        self.systemctl("reset-failed", UNIT, check=False)

    def uninstall(self) -> None:
        """Leave the user as we found it: no unit of ours over the packaged one, no state."""
        self.systemctl("stop", UNIT, check=False)
        self.box.run(["rm", "-rf", f"{self.unit_dir}/{UNIT}", f"{self.unit_dir}/{UNIT}.d",
                      f"{self.home}/.agentctl", f"{self.home}/dev", f"{self.home}/{FAKE_AGENT}"])
        self.systemctl("daemon-reload", check=False)
        self.systemctl("reset-failed", UNIT, check=False)


def processes(box: Container) -> list[tuple[int, int, int, str, str]]:
    """Every live process in the container, from /proc."""
    return [tuple(p) for p in json.loads(box.run(["/usr/bin/python3", "-c", PROC_WALK]).stdout)]  # type: ignore[misc]


def service_processes(box: Container) -> set[tuple[int, int]]:
    """(pid, starttime) of every process in the service's cgroup: a process identity."""
    return {(pid, start) for pid, start, _, cgroup, _ in processes(box) if f"/{UNIT}" in cgroup}


def user_leftovers(box: Container, uid: int) -> list[str]:
    """The user's processes besides the user manager itself."""
    manager = ("/lib/systemd/systemd --user", "/usr/lib/systemd/systemd --user", "(sd-pam)")
    return [f"{pid} {cmd}" for pid, _, owner, _, cmd in processes(box)
            if owner == uid and not cmd.startswith(manager)]


def persistent_journal(box: Container) -> None:
    """/var/log/journal, as on an installed Debian: journald then keeps a file per user."""
    box.run("mkdir -p /var/log/journal && systemd-tmpfiles --create --prefix /var/log/journal "
            "&& journalctl --flush")


@pytest.fixture(scope="module")
def service(container: Container, swarm_user: str, agentctl_venv: str) -> Iterator[Service]:
    """The installed, started service; ``started`` holds what was seen as ``start`` returned."""
    svc = Service(container, swarm_user, agentctl_venv)
    persistent_journal(container)
    container.write_file(f"{svc.home}/{FAKE_AGENT}", (CHECKOUT / "tests/fakes/fake_claude.py").read_text(),
                         owner=swarm_user)
    svc.systemctl("stop", UNIT, check=False)
    container.run(["rm", "-rf", f"{svc.home}/.agentctl", f"{svc.home}/dev"])
    svc.write_config(svc.config())
    svc.install()
    called = time.time()
    started = svc.box.user_systemctl("start", UNIT, user=swarm_user, check=False, timeout=150)
    returned = time.time()
    snapshot = svc.status() if started.returncode == 0 else {}
    svc.started = {"called": called, "returned": returned, "snapshot": snapshot, "result": started}
    try:
        yield svc
    finally:
        svc.uninstall()


def test_start_returns_only_after_ready_with_daemons_up(service: Service) -> None:
    started = service.started
    tail = "\n".join(str(e.get("MESSAGE")) for e in service.messages()[-20:])
    assert started["result"].returncode == 0, started["result"].stderr + tail
    snap = started["snapshot"]
    assert snap["supervisor"]["ready"] is True
    agents = snap["agents"]
    assert [a["name"] for a in agents] == [FIRST, SECOND]
    assert all(a["connected"] and a["pid"] for a in agents), agents
    ready = service.messages("EVENT=ready")
    assert ready, "no 'swarm ready' entry in the journal"
    assert int(str(ready[-1]["__REALTIME_TIMESTAMP"])) / 1e6 <= started["returned"]
    assert service.show("ActiveState", "SubState") == {"ActiveState": "active", "SubState": "running"}


def test_status_shows_the_status_line(service: Service) -> None:
    out = service.systemctl("status", UNIT, check=False)
    assert re.search(rf'^\s*Status: "{COUNT} daemons, 0 active, [^"]+"$', out, re.MULTILINE), out


def test_memory_limit_is_enforced_with_rlimit(service: Service) -> None:
    """The user manager has no memory controller to delegate here: RLIMIT_AS, and why."""
    sup = service.status()["supervisor"]
    assert sup["memory_enforcement"] == "rlimit"
    assert "no memory controller" in sup["memory_enforcement_detail"]
    assert "memory: rlimit" in service.cli("swarm", "status")
    warned = [str(e["MESSAGE"]) for e in service.messages("PRIORITY=4")]
    assert any("RLIMIT_AS" in m for m in warned), warned


def test_journal_entries_are_selectable_by_agent_name(service: Service) -> None:
    mine = service.messages(f"AGENT_NAME={FIRST}")
    assert mine and all(e["AGENT_NAME"] == FIRST for e in mine)
    assert all(e.get("AGENT_ROLE") == "general" for e in mine)
    assert any(e.get("EVENT") == "boot" and FIRST in str(e["MESSAGE"]) for e in mine)
    assert all(e.get("SYSLOG_IDENTIFIER") == "agentctl-swarm" for e in mine)
    assert service.messages("AGENT_NAME=swarm-general-999") == []


def test_logs_reads_the_journal_for_the_user(service: Service) -> None:
    out = service.cli("swarm", "logs", FIRST)
    assert re.search(rf"{FIRST} ready in \d+ ms \(pid \d+, ", out), out
    assert f"{SECOND} ready in" not in out
    everything = service.cli("swarm", "logs")
    assert "swarm ready:" in everything and f"{SECOND} ready in" in everything


def test_tasks_end_to_end_and_oom_under_rlimit(service: Service) -> None:
    before = service.pids()
    service.cli("task", "add", "x [fake:success]", "--id", "sd-ok")
    assert service.wait_task("sd-ok", ("done", "failed"))["state"] == "done"
    service.cli("task", "add", "y [fake:alloc:700]", "--id", "sd-oom")
    oom = service.wait_task("sd-oom", ("done", "failed"))
    assert (oom["state"], oom["reason"]) == ("failed", "oom"), oom
    assert service.pids() == before, "a daemon was replaced: the session's overrun should not touch it"
    output = service.messages("TASK_ID=sd-ok", "EVENT=session-output")
    assert output and all(e.get("AGENT_NAME") in (FIRST, SECOND) for e in output)


def test_reload_applies_max_active(service: Service) -> None:
    pid = service.show("MainPID")["MainPID"]
    service.write_config(service.config(**{"max-active": 2}))
    service.systemctl("reload", UNIT)
    assert service.status()["supervisor"]["max_active"] == 2
    said = [str(e["MESSAGE"]) for e in service.messages("EVENT=reload")]
    assert "config reloaded: max-active 5->2" in said, said
    assert service.show("MainPID", "ActiveState") == {"MainPID": pid, "ActiveState": "active"}


def test_reload_with_a_broken_file_keeps_the_old_config(service: Service) -> None:
    daemons = service.pids()
    service.write_config(service.config(**{"max-active": 2}) + "\n{broken: [\n")
    service.systemctl("reload", UNIT)
    try:
        assert service.status()["supervisor"]["max_active"] == 2
        failed = [str(e["MESSAGE"]) for e in service.messages("EVENT=reload-failed")]
        assert failed and failed[-1].startswith("config reload failed, keeping the old config: "
                                                f"{service.config_path}"), failed
        assert service.pids() == daemons
        assert service.show("ActiveState")["ActiveState"] == "active"
    finally:
        service.write_config(service.config(**{"max-active": 2}))


def test_watchdog_kills_a_stopped_supervisor_and_leaves_no_orphan(service: Service) -> None:
    """SIGSTOP: no WATCHDOG=1 for 3 s, systemd aborts it, kills the rest, starts a new run."""
    first = service.show("MainPID", "NRestarts")
    time.sleep(max(0.0, WATCHDOG_S + 0.5 - service.status()["supervisor"]["uptime_s"]))
    assert service.show("MainPID", "NRestarts") == first, "restarted although it was running"
    assert first["NRestarts"] == "0", "the running supervisor did not keep the watchdog fed"
    service.cli("task", "add", "z [fake:hang]", "--id", "sd-hang")
    service.wait_task("sd-hang", ("running",))
    old_daemons = set(service.pids().values())
    old = service_processes(service.box)
    before = service.show("MainPID", "NRestarts")
    assert len(old) >= 3 + COUNT + 2, old  # supervisor, relay, fork-server, daemons, session + child
    service.box.run(["kill", "-STOP", before["MainPID"]])

    def restarted() -> bool:
        now = service.show("MainPID", "NRestarts", "ActiveState")
        return (int(now["NRestarts"]) > int(before["NRestarts"]) and now["ActiveState"] == "active"
                and now["MainPID"] not in ("0", before["MainPID"]))
    service.box.wait_for(restarted, timeout=20, what="the watchdog restart")
    said = [str(e.get("MESSAGE", "")) for e in service.box.manager_journal(UNIT)]
    assert any("Watchdog timeout" in line for line in said), said[-10:]
    agents = service.status()["agents"]
    assert all(a["connected"] for a in agents) and len(agents) == COUNT, agents
    assert not old_daemons & {a["pid"] for a in agents}
    survivors = old & service_processes(service.box)
    assert not survivors, f"processes of the killed run still alive: {survivors}"
    everywhere = {(pid, start) for pid, start, *_ in processes(service.box)}
    assert not old & everywhere, "a process of the killed run escaped the cgroup"


def test_stop_ends_everything_within_the_grace_period(service: Service) -> None:
    """Even a session that ignores SIGTERM: TERM, GRACE_S, KILL; systemd never has to step in."""
    service.cli("task", "cancel", "sd-hang", check=False)
    service.cli("task", "add", "w [fake:hang-ignore-term]", "--id", "sd-stubborn")
    service.wait_task("sd-stubborn", ("running",))
    begun = time.monotonic()
    service.systemctl("stop", UNIT)
    took = time.monotonic() - begun
    assert took < GRACE_S + 5.0, f"stop took {took:.1f}s"
    assert service.show("ActiveState", "Result") == {"ActiveState": "inactive", "Result": "success"}
    assert not service_processes(service.box)
    uid = service.box.uid(service.user)
    assert user_leftovers(service.box, uid) == []
    said = [str(e["MESSAGE"]) for e in service.messages("EVENT=stopped")]
    assert said and said[-1] == "swarm stopped"


def test_install_unit_writes_a_unit_for_the_venv(service: Service) -> None:
    """``agentctl swarm install-unit`` in the pip-installed copy (the venv), as the user."""
    assert not service.install_unit_error, (
        "agentctl swarm install-unit failed in the venv (is agentctl_swarm/data/*.service "
        f"package data in pyproject.toml?): {service.install_unit_error}")
    scratch = "/tmp/install-unit-check"
    service.box.run(["rm", "-rf", scratch])
    service.box.run([service.agentctl, "swarm", "install-unit"], user=service.user,
                    env={"XDG_CONFIG_HOME": scratch})
    written = service.box.read_file(f"{scratch}/systemd/user/{UNIT}")
    assert re.search(r"^ExecStart=/opt/agentctl-venv/bin/python3? -m agentctl_swarm\.cli swarm start$",
                     written, re.MULTILINE), written
    verify = service.box.run(["systemd-analyze", "verify", "--user", f"{scratch}/systemd/user/{UNIT}"],
                             user=service.user, check=False)
    assert verify.returncode == 0, verify.stderr
