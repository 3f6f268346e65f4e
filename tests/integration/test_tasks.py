"""Tasks end to end: claim, assign, promote, session, DONE/FAIL/BLOCKED, limits and recovery."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.swarmlib import Swarm, alive, base_config, swarm_processes


def _log(swarm: Swarm) -> str:
    return (swarm.home / ".agentctl" / "logs" / "supervisor.log").read_text()


def _events(swarm: Swarm, event: str) -> list[dict]:
    out = []
    for line in _log(swarm).splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == event:
            out.append(rec)
    return out


@pytest.fixture
def make_swarm(tmp_path: Path):
    made: list[Swarm] = []

    def make(**overrides) -> Swarm:
        swarm = Swarm(tmp_path / f"home{len(made)}", base_config(**overrides))
        made.append(swarm)
        return swarm.start()

    yield make
    for swarm in made:
        swarm.stop()
        swarm.kill()


def test_full_cycle_three_daemons_five_tasks(make_swarm) -> None:
    swarm = make_swarm(count=3)
    ids = [f"job{i}" for i in range(5)]
    for i, task_id in enumerate(ids):
        swarm.add_task(f"build part {i} [fake:slow:0.5]", task_id)
    tasks = swarm.wait_tasks(ids, timeout=60)
    for task_id in ids:
        task = tasks[task_id]
        assert task["agent"].startswith("swarm-general-") and task["tokens"] > 0
        assert task["started"] and task["finished"] >= task["started"]
        context = (swarm.home / "dev" / "claude" / task["agent"] / "context.md").read_text()
        assert "Last task" in context
    # exactly one session per task: one "session-start" per id
    starts = [r.get("task") for r in _events(swarm, "session-start")]
    assert sorted(starts) == sorted(ids)
    swarm.wait_for(lambda: all(a["status"] == "idle" for a in swarm.agents().values()), 10, "idle")
    assert swarm.status()["supervisor"]["budget"]["used"] == sum(tasks[i]["tokens"] for i in ids)


def test_max_active_one(make_swarm) -> None:
    swarm = make_swarm(count=3, **{"max-active": 1})
    ids = ["a", "b", "c"]
    for task_id in ids:
        swarm.add_task("slow [fake:slow:1]", task_id)
    peak = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        agents = swarm.agents().values()
        peak = max(peak, sum(1 for a in agents if a["status"] in ("promoting", "active")))
        tasks = swarm.tasks()
        if all(tasks[i]["state"] == "done" for i in ids):
            break
        time.sleep(0.05)
    tasks = swarm.tasks()
    assert all(tasks[i]["state"] == "done" for i in ids), tasks
    assert peak == 1
    spans = sorted((tasks[i]["started"], tasks[i]["finished"]) for i in ids)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end - 0.05, spans  # never two sessions at once


def test_budget_pauses_and_reload_resumes(make_swarm) -> None:
    swarm = make_swarm(count=2, **{"token-budget": 1000})
    swarm.add_task("first [fake:tokens:1500]", "t1")
    swarm.wait_tasks(["t1"])
    swarm.add_task("second [fake:success]", "t2")
    paused = swarm.wait_for(lambda: swarm.status()["supervisor"]["paused"], 10, "pause")
    assert "budget" in paused
    time.sleep(1.0)
    assert swarm.tasks()["t2"]["state"] == "queued"
    config = dict(swarm.config, **{"token-budget": 10_000_000})
    swarm.write_config(config)
    swarm.signal(signal.SIGHUP)
    swarm.wait_tasks(["t2"])
    assert swarm.status()["supervisor"]["paused"] is None
    assert json.loads((swarm.state_dir / "budget.json").read_text())["used"] >= 1500


def test_quota_pauses_all_and_probe_resumes(make_swarm, tmp_path: Path) -> None:
    flag = tmp_path / "quota-exhausted"
    flag.write_text("1")
    swarm = make_swarm(count=2, **{"quota-probe-interval": "1s",
                                   "quota-probe-prompt": f"probe [fake:quota-while:{flag}]"})
    swarm.add_task(f"work [fake:quota-while:{flag}]", "q1")
    paused = swarm.wait_for(lambda: swarm.status()["supervisor"]["paused"], 20, "quota pause")
    assert "quota" in paused
    task = swarm.tasks()["q1"]
    assert task["state"] == "queued" and task["reason"] == "quota"
    swarm.add_task("meanwhile [fake:success]", "q2")
    time.sleep(2.5)  # probes run and fail; nothing is promoted
    assert {t["state"] for t in swarm.tasks().values()} == {"queued"}
    assert _events(swarm, "quota-probe")
    flag.unlink()  # the quota is back
    swarm.wait_tasks(["q1", "q2"], timeout=30)
    assert swarm.status()["supervisor"]["paused"] is None
    assert _events(swarm, "quota-restored")


@pytest.mark.parametrize("mode,state,reason", [
    ("overflow", "failed", "context-overflow"),
    ("deny", "blocked", "sandbox-denied"),
])
def test_failure_reports(make_swarm, mode: str, state: str, reason: str) -> None:
    swarm = make_swarm(count=1)
    swarm.add_task(f"x [fake:{mode}]", "f1")
    task = swarm.wait_tasks(["f1"], (state,))["f1"]
    assert task["reason"] == reason
    agent = swarm.agents()[task["agent"]]
    context = (Path(agent["workspace"]) / "context.md").read_text()
    assert reason in context and "Partial output" in context


def test_timeout_kills_the_session(make_swarm) -> None:
    swarm = make_swarm(count=1, **{"max-task-duration": "1s", "shutdown-grace": "1s"})
    swarm.add_task("stuck [fake:hang-ignore-term]", "h1")
    task = swarm.wait_tasks(["h1"], ("queued", "failed"), timeout=30)["h1"]
    swarm.wait_for(lambda: swarm.tasks()["h1"]["reason"] == "timeout" or
                   swarm.tasks()["h1"]["state"] == "failed", 30, "timeout")
    workspace = Path(swarm.agents()["swarm-general-001"]["workspace"])
    child = workspace / "fake-child.pid"
    if child.exists():  # the session's own child (as a Bash tool would be) is gone too
        assert not alive(int(child.read_text()))
    assert "timeout" in (workspace / "context.md").read_text()
    assert task is not None


def test_daemon_crash_mid_task_requeues(make_swarm) -> None:
    swarm = make_swarm(count=2)
    swarm.add_task("long [fake:slow:3]", "c1")
    running = swarm.wait_for(lambda: (t := swarm.tasks()["c1"])["state"] == "running" and t, 20, "running")
    victim = swarm.agents()[running["agent"]]
    os.kill(victim["pid"], signal.SIGKILL)
    task = swarm.wait_tasks(["c1"], timeout=60)["c1"]
    assert task["attempts"] >= 1
    assert any("interrupted" in (r.get("msg") or "") for r in _events(swarm, "interrupted")) or \
        "interrupted" in _log(swarm)
    swarm.wait_for(lambda: swarm.agents()[victim["name"]]["restarts"] == 1, 10, "restart")


def test_tasks_survive_supervisor_restart(make_swarm, tmp_path: Path) -> None:
    swarm = make_swarm(count=1, **{"max-active": 1})
    swarm.add_task("long [fake:slow:30]", "s1")
    swarm.add_task("later [fake:success]", "s2")
    swarm.wait_for(lambda: swarm.tasks()["s1"]["state"] == "running", 20, "s1 running")
    swarm.kill()  # as a crash: no chance to save anything more
    swarm.wait_for(lambda: not swarm_processes(swarm.home), 10, "old run gone")
    saved = json.loads((swarm.state_dir / "tasks.json").read_text())
    assert {t["id"] for t in saved["tasks"]} == {"s1", "s2"}
    swarm.start(wait_ready=False)  # its one agent may pick the requeued task up at once
    swarm.wait_for(lambda: swarm.status()["supervisor"]["ready"], 30, "the restarted swarm")
    tasks = swarm.tasks()
    assert set(tasks) == {"s1", "s2"} and tasks["s2"]["state"] in ("queued", "announced", "assigned",
                                                                   "running", "done")
    assert tasks["s1"]["state"] != "running" or tasks["s1"]["agent"]


def test_shutdown_with_active_session_requeues(make_swarm) -> None:
    swarm = make_swarm(count=1, **{"shutdown-grace": "2s"})
    swarm.add_task("long [fake:hang-ignore-term]", "d1")
    swarm.wait_for(lambda: swarm.tasks()["d1"]["state"] == "running", 20, "running")
    started = time.monotonic()
    assert swarm.stop() == 0
    assert time.monotonic() - started < 2 + 8
    assert swarm_processes(swarm.home) == []
    saved = {t["id"]: t for t in json.loads((swarm.state_dir / "tasks.json").read_text())["tasks"]}
    assert saved["d1"]["state"] == "queued"  # not lost: it runs again on the next start


def test_cancel(make_swarm) -> None:
    swarm = make_swarm(count=1)
    swarm.add_task("long [fake:slow:30]", "x1")
    swarm.add_task("waiting [fake:success]", "x2", role="qa")  # no qa daemon: stays queued
    swarm.wait_for(lambda: swarm.tasks()["x1"]["state"] == "running", 20, "running")
    swarm.cli("task", "cancel", "x2")
    swarm.cli("task", "cancel", "x1")
    tasks = swarm.wait_tasks(["x1", "x2"], ("cancelled",), timeout=30)
    assert tasks["x1"]["state"] == tasks["x2"]["state"] == "cancelled"
    bad = swarm.cli("task", "cancel", "x1", check=False)
    assert bad.returncode == 1 and "already cancelled" in bad.stderr
    dup = swarm.cli("task", "add", "again", "--id", "x1", check=False)
    assert dup.returncode == 1 and "already exists" in dup.stderr
    for bad_id in ("../etc", "a" * 65, "-rf", "x y"):
        result = swarm.cli("task", "add", "p", f"--id={bad_id}", check=False)
        assert result.returncode == 1 and "invalid task id" in result.stderr, bad_id


def test_status_shows_active_task_and_elapsed(make_swarm) -> None:
    swarm = make_swarm(count=1)
    swarm.add_task("long [fake:slow:5]", "e1")
    agent = swarm.wait_for(lambda: (a := swarm.agents()["swarm-general-001"])["task"] == "e1" and
                           a["task_elapsed_s"] is not None and a["task_elapsed_s"] >= 1 and a, 20, "elapsed")
    assert agent["status"] == "active"
    assert "e1 (" in swarm.cli("swarm", "status").stdout


def _raw_client(url: str, name: str, lines: list[str], listen_s: float = 0.0) -> list[dict]:
    """A hostile or observing peer on #agents: sends ``lines``, returns what it heard."""
    from agentctl_swarm.agentchat.client import AgentChatClient
    from agentctl_swarm.agentchat.identity import Identity

    heard: list[dict] = []

    async def main() -> None:
        client = AgentChatClient(url, Identity.generate(name), ["#agents"], on_message=heard.append,
                                 send_interval=0.02)
        task = asyncio.create_task(client.run())
        assert await client.wait_connected(10)
        for line in lines:
            client.send("#agents", line)
        deadline = time.monotonic() + 20
        while client.queued and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(listen_s)
        await client.close()
        task.cancel()

    asyncio.run(main())
    return heard


def test_hostile_channel_lines_change_nothing(make_swarm) -> None:
    swarm = make_swarm(count=2)
    swarm.add_task("real work [fake:slow:1]", "real1")
    swarm.wait_tasks(["real1"])
    before = swarm.tasks()
    url = swarm.status()["supervisor"]["agentchat_server"]
    hostile = [
        "ASSIGN ghost-task swarm-general-001",  # spoofed: not from the coordinator
        "ASSIGN real1 swarm-general-002",
        "TASK ../../etc/passwd any read it",
        "TASK good-id notarole do it",
        "CLAIM ../x swarm-general-001",
        "DONE real1 swarm-general-001 " + "A" * 10000,
        "X" * 10000,
        "FROBNICATE 1 2 3",
        "TASK  double-space any p",
        "HEARTBEAT swarm-general-001 $(rm -rf /)",
        "TASK t;rm any p",
    ]
    _raw_client(url, "mallory", hostile, listen_s=1.0)
    time.sleep(1.0)
    after = swarm.tasks()
    assert set(after) == set(before) | set()  # no task appeared from malformed or spoofed lines
    assert after["real1"] == before["real1"]
    agents = swarm.agents()
    assert all(a["status"] == "idle" and a["restarts"] == 0 for a in agents.values())
    assert "ghost-task" not in _log(swarm) or "not the coordinator" in _log(swarm)


def test_two_claims_one_runs(make_swarm) -> None:
    """A rival claims the same task at once: only one daemon ever runs it."""
    swarm = make_swarm(count=3)
    url = swarm.status()["supervisor"]["agentchat_server"]
    heard = []
    thread = threading.Thread(target=lambda: heard.extend(
        _raw_client(url, "observer", [], listen_s=6.0)))
    thread.start()
    time.sleep(1.0)
    swarm.add_task("contested [fake:slow:1]", "k1")
    swarm.wait_tasks(["k1"])
    thread.join(20)
    lines = [m.get("content", "") for m in heard]
    assigns = [line for line in lines if line.startswith("ASSIGN k1 ")]
    dones = [line for line in lines if line.startswith("DONE k1 ")]
    assert len(assigns) == 1 and len(dones) == 1, lines
    assert dones[0].split()[2] == assigns[0].split()[2]
    assert sorted(r.get("task") for r in _events(swarm, "session-start")) == ["k1"]


def test_relay_loss_while_active_keeps_working(make_swarm) -> None:
    swarm = make_swarm(count=1, **{"status-interval": "0.2s"})
    swarm.add_task("long [fake:slow:4:8]", "r1")
    swarm.wait_for(lambda: swarm.tasks()["r1"]["state"] == "running", 20, "running")
    relay = swarm.status()["supervisor"]["relay_pid"]
    os.kill(relay, signal.SIGKILL)  # the supervisor restarts it on the same port
    task = swarm.wait_tasks(["r1"], timeout=60)["r1"]
    assert task["agent"] == "swarm-general-001"
    swarm.wait_for(lambda: swarm.agents()["swarm-general-001"]["connected"], 30, "reconnect")
    assert swarm.status()["supervisor"]["relay_pid"] not in (None, relay)


def test_repo_clone_and_task_branch(make_swarm, tmp_path: Path) -> None:
    import subprocess
    origin = tmp_path / "origin"
    origin.mkdir()
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "commit", "-q", "--allow-empty", "-m", "root"]):
        subprocess.run(cmd, cwd=origin, check=True, env=env)
    (origin / ".gitignore").write_text("build/\n")
    subprocess.run(["git", "add", ".gitignore"], cwd=origin, check=True, env=env)
    subprocess.run(["git", "commit", "-q", "-m", "ignore"], cwd=origin, check=True, env=env)
    swarm = make_swarm(count=1, repo=str(origin))
    ws = Path(swarm.agents()["swarm-general-001"]["workspace"])
    assert (ws / ".git").is_dir() and (ws / ".gitignore").read_text() == "build/\n"
    exclude = (ws / ".git" / "info" / "exclude").read_text()
    assert "*.pem" in exclude and ".agentchat/" in exclude  # protection kept without touching tracked files
    status = subprocess.run(["git", "status", "--porcelain"], cwd=ws, capture_output=True, text=True).stdout
    assert ".agentchat" not in status and "CLAUDE.md" in status  # keys never show up as committable
    swarm.add_task("work [fake:success]", "br-1")
    swarm.wait_tasks(["br-1"])
    branch = subprocess.run(["git", "branch", "--show-current"], cwd=ws, capture_output=True,
                            text=True).stdout.strip()
    assert branch == "swarm/swarm-general-001/br-1"
