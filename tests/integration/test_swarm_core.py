"""The core swarm with real processes: start, heartbeat, crash and restart, scale, reload, stop."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from agentctl_swarm.system import proc
from tests.swarmlib import AGENTCTL, Swarm, alive, base_config, swarm_processes


@pytest.fixture
def swarm(tmp_path: Path):
    s = Swarm(tmp_path / "home", base_config(count=3))
    yield s
    s.stop()
    s.kill()


def test_start_status_and_workspaces(swarm: Swarm) -> None:
    snap = swarm.start().status()
    sup = snap["supervisor"]
    assert set(sup) >= {"pid", "uptime_s", "config_path", "agentchat_server", "paused"}
    assert sup["pid"] == swarm.proc.pid and sup["agentchat_server"].startswith("ws://127.0.0.1:")
    assert sup["paused"] is None
    names = sorted(a["name"] for a in snap["agents"])
    assert names == ["swarm-general-001", "swarm-general-002", "swarm-general-003"]
    for agent in snap["agents"]:
        assert set(agent) >= {"name", "role", "pid", "status", "restarts", "last_heartbeat_age_s",
                              "workspace", "rss_mb"}
        assert agent["status"] == "idle" and agent["restarts"] == 0 and agent["role"] == "general"
        os.kill(agent["pid"], 0)
        ws = Path(agent["workspace"])
        assert ws == swarm.home / "dev" / "claude" / agent["name"]
        assert (ws / ".gitignore").read_text().splitlines()[1:4] == ["*.key", "*.pem", "*.p12"]
        identity = ws / ".agentchat" / "identities" / f"{agent['name']}.json"
        assert stat.S_IMODE(identity.stat().st_mode) == 0o600
        assert {"name", "pubkey", "privkey", "created"} <= set(json.loads(identity.read_text()))
        assert "general" in (ws / "CLAUDE.md").read_text() and "#agents" in (ws / "CLAUDE.md").read_text()
        assert (ws / "context.md").exists()
    sock = swarm.home / ".agentctl" / "run" / "control.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600


def test_each_start_logs_where_its_boot_time_went(swarm: Swarm) -> None:
    swarm.start()
    log = swarm.home / ".agentctl" / "logs" / "supervisor.log"
    swarm.wait_for(lambda: log.read_text().count('"event": "boot"') >= 3, 10, "three boot lines")
    lines = [json.loads(line) for line in log.read_text().splitlines() if '"event": "boot"' in line]
    assert sorted(e["agent"] for e in lines) == ["swarm-general-001", "swarm-general-002", "swarm-general-003"]
    pids = {a["name"]: a["pid"] for a in swarm.status()["agents"]}
    for entry in lines:
        name, rest = entry["msg"].split(" ready in ")
        total, inside = rest.split(" ms (")
        who, phases = inside.rstrip(")").split("; ")
        assert who == f"pid {pids[name]}, fork-server", entry["msg"]  # one line per start, with its PID
        parts = dict((k, float(v)) for k, v in (p.split() for p in phases.split(", ")))
        assert list(parts) == ["spawn", "prepare", "confine", "connect", "other"], entry["msg"]
        assert all(v >= 0 for v in parts.values()) and parts["connect"] > 0
        assert abs(sum(parts.values()) - float(total)) <= 2, entry["msg"]  # the phases add up
        assert 0 < entry["boot_ms"] < 30_000


def test_human_status_and_logs(swarm: Swarm) -> None:
    swarm.start()
    out = swarm.cli("swarm", "status").stdout
    assert "swarm-general-002" in out and "idle" in out
    logs = swarm.cli("swarm", "logs").stdout
    assert "swarm ready" in logs
    agent_log = swarm.cli("swarm", "logs", "swarm-general-001").stdout
    assert "swarm-general-001" in agent_log or "started" in agent_log
    bad = swarm.cli("swarm", "logs", "no-such-agent", check=False)
    assert bad.returncode != 0 and bad.stderr.count("\n") <= 1


def test_kill_9_restarts_with_backoff(swarm: Swarm) -> None:
    swarm.start()
    victim = swarm.agents()["swarm-general-002"]
    killed_at = time.monotonic()
    os.kill(victim["pid"], signal.SIGKILL)
    back = swarm.wait_for(lambda: (a := swarm.agents()["swarm-general-002"])["pid"] not in
                          (None, victim["pid"]) and a["connected"] and a, 15, "first restart")
    first_delay = time.monotonic() - killed_at
    assert back["restarts"] == 1 and Path(back["workspace"]) == Path(victim["workspace"])
    assert 0.9 <= first_delay < 5, first_delay
    killed_at = time.monotonic()
    os.kill(back["pid"], signal.SIGKILL)
    again = swarm.wait_for(lambda: (a := swarm.agents()["swarm-general-002"])["pid"] not in
                           (None, back["pid"]) and a["connected"] and a, 15, "second restart")
    assert again["restarts"] == 2
    assert time.monotonic() - killed_at >= 1.9  # the second restart waits 2^1 s
    identity = Path(again["workspace"]) / ".agentchat" / "identities" / "swarm-general-002.json"
    assert json.loads(identity.read_text())["pubkey"] == \
        json.loads(identity.read_text())["pubkey"]  # same workspace, same identity file
    assert swarm.agents()["swarm-general-001"]["restarts"] == 0


def test_scale_up_and_down(swarm: Swarm) -> None:
    swarm.start()
    assert "3 -> 5" in swarm.cli("swarm", "scale", "5").stdout
    swarm.wait_for(lambda: len(a := swarm.agents()) == 5 and all(x["connected"] for x in a.values()),
                   20, "5 daemons")
    keep = swarm.agents()
    swarm.cli("swarm", "scale", "2")
    left = swarm.wait_for(lambda: len(a := swarm.agents()) == 2 and a, 20, "2 daemons")
    for name, agent in left.items():
        assert agent["pid"] == keep[name]["pid"]  # survivors were not restarted
    gone = set(keep) - set(left)
    for name in gone:
        assert not (swarm.home / "dev" / "claude" / name).exists()  # persist: false
    assert json.loads((swarm.state_dir / "desired.json").read_text())["count"] == 2
    bad = swarm.cli("swarm", "scale", "-3", check=False)
    assert bad.returncode != 0 and "expected a count" in bad.stderr


def test_reload_applies_and_broken_file_keeps_old(swarm: Swarm) -> None:
    swarm.start()
    config = dict(swarm.config, **{"max-active": 9})
    swarm.write_config(config)
    swarm.signal(signal.SIGHUP)
    swarm.wait_for(lambda: swarm.status()["supervisor"]["max_active"] == 9, 10, "reload")
    log = (swarm.home / ".agentctl" / "logs" / "supervisor.log").read_text()
    assert "config reloaded: max-active 5->9" in log
    swarm.config_path.write_text("max-active: [not, a, number\n")
    swarm.signal(signal.SIGHUP)
    swarm.wait_for(lambda: "config reload failed" in
                   (swarm.home / ".agentctl" / "logs" / "supervisor.log").read_text(), 10, "refusal")
    assert swarm.status()["supervisor"]["max_active"] == 9
    result = swarm.cli("swarm", "reload", check=False)
    assert result.returncode == 1 and "old config kept" in result.stderr
    assert len(swarm.agents()) == 3


def test_second_start_is_refused(swarm: Swarm) -> None:
    swarm.start()
    second = subprocess.run([*AGENTCTL, "swarm", "start"], env=swarm.env(), capture_output=True,
                            text=True, timeout=30)
    assert second.returncode != 0
    assert f"already running (pid {swarm.proc.pid}" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    assert swarm.status()["supervisor"]["pid"] == swarm.proc.pid


def test_not_running_and_bad_input(tmp_path: Path) -> None:
    s = Swarm(tmp_path / "home")
    s.home.mkdir()
    status = s.cli("swarm", "status", check=False)
    assert status.returncode == 3 and "not running" in status.stderr
    s.write_config({"count": 2, "max-active": "lots"})
    start = subprocess.run([*AGENTCTL, "swarm", "start"], env=s.env(), capture_output=True, text=True,
                           timeout=30)
    assert start.returncode != 0
    line = start.stderr.strip()
    assert "\n" not in line and "swarm.yaml" in line and "max-active" in line and "Traceback" not in line
    assert not (s.home / ".agentctl" / "swarm.pid").exists() or s.cli("swarm", "status", check=False).returncode == 3


def test_stop_is_clean(swarm: Swarm) -> None:
    swarm.start()
    pids = [a["pid"] for a in swarm.agents().values()]
    assert swarm.cli("swarm", "stop").returncode == 0
    assert swarm.proc.wait(20) == 0
    assert not any(alive(pid) for pid in pids)
    assert swarm_processes(swarm.home) == []
    assert not (swarm.home / ".agentctl" / "run" / "control.sock").exists()
    assert not (swarm.home / ".agentctl" / "swarm.pid").exists()
    assert list((swarm.home / "dev" / "claude").iterdir()) == []


def test_sigterm_with_a_stopped_daemon(swarm: Swarm) -> None:
    """A child that cannot obey SIGTERM is killed once the grace period is over."""
    swarm.start()
    stuck = swarm.agents()["swarm-general-001"]["pid"]
    os.kill(stuck, signal.SIGSTOP)
    started = time.monotonic()
    assert swarm.stop(timeout=30) == 0
    assert time.monotonic() - started < 3 + 8  # shutdown-grace 3s, plus the kill and cleanup
    assert not alive(stuck)
    assert swarm_processes(swarm.home) == []


def test_supervisor_kill_9_leaves_nothing_and_restarts(swarm: Swarm) -> None:
    swarm.start()
    pids = [a["pid"] for a in swarm.agents().values()]
    swarm.kill()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and swarm_processes(swarm.home):
        time.sleep(0.1)
    assert swarm_processes(swarm.home) == [], "daemons outlived their supervisor"
    assert not any(alive(pid) for pid in pids)
    swarm.start()  # the stale pidfile does not block
    assert len(swarm.agents()) == 3


def test_heartbeat_misses_declare_dead(tmp_path: Path) -> None:
    cfg = base_config(count=2, **{"heartbeat-interval": "2s", "heartbeat-misses": 3})
    with Swarm(tmp_path / "home", cfg) as swarm:
        swarm.start()
        victim = swarm.agents()["swarm-general-001"]
        os.kill(victim["pid"], signal.SIGSTOP)
        stopped_at = time.monotonic()
        time.sleep(2.5)  # at least one miss, at most two: not dead yet
        assert swarm.agents()["swarm-general-001"]["pid"] == victim["pid"]
        swarm.wait_for(lambda: swarm.agents()["swarm-general-001"]["pid"] not in (None, victim["pid"]),
                       30, "replacement")
        # dead 3.5 intervals after its last heartbeat, which came at most one interval before the stop
        assert time.monotonic() - stopped_at >= 2 * 3.5 - 2
        log = (swarm.home / ".agentctl" / "logs" / "supervisor.log").read_text()
        assert "missed 3 heartbeats" in log


def _children(pid: int) -> list[tuple[int, str, bytes]]:
    """(pid, state, cmdline) of every child of ``pid``, zombies included."""
    found = []
    for child in proc.children_of(pid):
        try:
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
            found.append((child, state, Path(f"/proc/{child}/cmdline").read_bytes()))
        except OSError:
            continue
    return found


def test_exec_spawn_path(tmp_path: Path) -> None:
    with Swarm(tmp_path / "home", base_config(count=2, spawn="exec")) as swarm:
        swarm.start()
        assert {a["spawned_via"] for a in swarm.agents().values()} == {"exec"}
        assert swarm.status()["supervisor"]["spawn"] == "exec"
        # The fork-server forked before the config was read is killed and reaped.
        assert swarm.status()["supervisor"]["forkserver_pid"] is None
        assert swarm.proc is not None
        kids = _children(swarm.proc.pid)
        assert not [k for k in kids if k[1] == "Z" or k[2].startswith(b"agentctl-swarm fork-server")], kids


def test_start_with_a_bad_config_leaves_nothing_behind(tmp_path: Path) -> None:
    swarm = Swarm(tmp_path / "home")
    swarm.config_path.parent.mkdir(parents=True)
    swarm.config_path.write_text("count: lots\n")
    result = swarm.cli("swarm", "start", check=False)
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1 and "count" in result.stderr, result.stderr
    assert swarm_processes(swarm.home) == []
    with swarm:  # the pid file was released: a good config starts
        swarm.start()
        assert swarm.status()["supervisor"]["forkserver_pid"] in [k[0] for k in _children(swarm.proc.pid)]


def test_forkserver_death_falls_back_and_recovers(swarm: Swarm) -> None:
    swarm.start()
    forkserver = swarm.status()["supervisor"]["forkserver_pid"]
    assert Path(f"/proc/{forkserver}/cmdline").read_bytes().startswith(b"agentctl-swarm fork-server")
    daemon = swarm.agents()["swarm-general-001"]["pid"]
    assert b"daemon swarm-general-001" in Path(f"/proc/{daemon}/cmdline").read_bytes()
    os.kill(forkserver, signal.SIGKILL)
    swarm.cli("swarm", "scale", "4")  # a start right now must not hang on the dead fork-server
    swarm.wait_for(lambda: len(a := swarm.agents()) == 4 and all(x["connected"] for x in a.values()),
                   20, "4th daemon")
    swarm.wait_for(lambda: swarm.status()["supervisor"]["forkserver_pid"] not in (None, forkserver),
                   15, "fork-server restart")


def test_roles_and_count_override(tmp_path: Path) -> None:
    cfg = base_config(count=4, roles={"builder": 2, "qa": 1})
    with Swarm(tmp_path / "home", cfg) as swarm:
        swarm.start("--count", "5")
        names = sorted(swarm.agents())
        assert names == ["swarm-builder-001", "swarm-builder-002", "swarm-general-001",
                         "swarm-general-002", "swarm-qa-001"]
        assert swarm.agents()["swarm-qa-001"]["role"] == "qa"


def _ksm_merge_any(pid: int) -> bool:
    return "ksm_merge_any: yes" in Path(f"/proc/{pid}/ksm_stat").read_text()


@pytest.mark.skipif(not Path("/proc/self/ksm_stat").exists(),
                    reason="no /proc/PID/ksm_stat here (Linux < 6.4 or built without KSM)")
def test_merge_pages_offers_daemons_to_ksm_but_never_sessions(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with Swarm(home, base_config(count=2, **{"merge-pages": True, "workspace-base": str(home / "ws")})) as swarm:
        swarm.start()
        status = swarm.status()
        ksm_on = Path("/sys/kernel/mm/ksm/run").read_text().strip() == "1"
        assert status["supervisor"]["merge_pages"] == {"configured": True, "ksm_running": ksm_on}
        assert all(_ksm_merge_any(a["pid"]) for a in status["agents"])
        assert not _ksm_merge_any(status["supervisor"]["pid"])  # only daemons opt in
        log = (home / ".agentctl" / "logs" / "supervisor.log").read_text()
        assert ("KSM is not running" in log) is not ksm_on
        swarm.add_task("report env [fake:env]", "env-1")
        agent = swarm.wait_tasks(["env-1"])["env-1"]["agent"]
        dump = json.loads((home / "ws" / agent / "fake-env.json").read_text())
        assert dump["ksm_merge_any"] is False, "an agent session inherited the daemon's KSM opt-in"
    with Swarm(tmp_path / "home2", base_config(count=1)) as plain:
        plain.start()
        assert not any(_ksm_merge_any(a["pid"]) for a in plain.status()["agents"])
