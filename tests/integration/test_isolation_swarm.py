"""Issue 5 end to end: real sessions in a real swarm try to escape, and fail.

The agent command of these swarms is ``tests/fakes/escape_agent.py --swarm``: a
hostile session that tries every way out we know of (planted credentials in the
swarm's HOME, the other agent's context.md and identity key, the swarm's state
and logs, writes outside the workspace, a symlink planted in its workspace, a
hard link, leaked descriptors, signals and /proc of the supervisor and daemons,
and the control socket directly and from a double-forked orphan) and reports
one line per attempt on stdout.

Where the report is read: the daemon logs every stdout line of a session in
``~/.agentctl/logs/agents/<agent>.log`` (JSON lines, ``event: session-output``,
``task: <id>``). That is complete and per task; the task's result summary is
cut to 1000 characters and goes to the channel, so it only carries the list of
attempts that worked (``escaped: none`` when the sandbox held).

Runs as root under ``sandbox: auto`` (Landlock here) and ``sandbox: bwrap``, and
as an ordinary user (the user-venv fixture of test_memory_limit.py).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentctl_swarm.system import sandbox
from tests.integration.test_memory_limit import UserSwarm, user_home, user_python  # noqa: F401 (fixtures)
from tests.integration.test_hostile import Loop, Peer
from tests.swarmlib import ROOT, FAKE_CLAUDE, Swarm, base_config

ESCAPE_AGENT = ROOT / "tests" / "fakes" / "escape_agent.py"
AGENTS = ("swarm-general-001", "swarm-general-002")
SSH_KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nplanted-ssh-key-do-not-leak\n"
AWS = "[default]\naws_secret_access_key = planted-aws-secret-do-not-leak\n"
API_KEY = "sk-ant-planted-api-key-0123456789"
FILE_SECRET = "planted-file-secret-abcdef"
TIMEOUT = 90.0
# The orphaned-descendant attempt has its own test below (it needs a double fork).
ORPHAN = "escape_control_orphan_task_add"
# The supervisor's environment carries these; no session may see them.
LEAKY_ENV = {"SSH_AUTH_SOCK": "/tmp/ssh-agent.sock", "AWS_ACCESS_KEY_ID": "AKIAPLANTED",
             "AWS_SECRET_ACCESS_KEY": "planted-aws-env", "GITHUB_TOKEN": "ghp_planted",
             "ANTHROPIC_API_KEY": "sk-ant-from-the-supervisor-env", "CLAUDECODE": "1",
             "GOOGLE_APPLICATION_CREDENTIALS": "/root/gcloud.json", "KUBECONFIG": "/root/.kube/config"}


# ----------------------------------------------------------------- helpers

def plant_credentials(home: Path) -> None:
    for rel, text in ((".ssh/id_ed25519", SSH_KEY), (".aws/credentials", AWS)):
        path = home / rel
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o600)


def escape_command(python: str, agent: Path, home: Path, agents: tuple[str, ...] = AGENTS) -> list[str]:
    agentctl = home / ".agentctl"
    return [python, "-I", str(agent), "--swarm", "--plant-home", str(home),
            "--state-dir", str(agentctl / "state"), "--control-socket", str(agentctl / "run" / "control.sock"),
            "--workspace-base", str(home / "ws"), "--agents", ",".join(agents)]


def swarm_config(command: list[str], home: Path, kind: str, **extra: Any) -> dict[str, Any]:
    return base_config(count=2, sandbox=kind, agent={"command": command},
                       **{"workspace-base": str(home / "ws")}, **extra)


def plant_symlinks(swarm: Swarm) -> None:
    """What an earlier session could have left: a link out of the workspace."""
    for name in AGENTS:
        link = swarm.home / "ws" / name / "planted-link"
        link.unlink(missing_ok=True)
        os.symlink(swarm.home / ".ssh" / "id_ed25519", link)


def session_lines(swarm: Swarm, agent: str, task_id: str) -> list[str]:
    """The stdout lines of one task's session, from the agent's JSON-lines log."""
    path = swarm.home / ".agentctl" / "logs" / "agents" / f"{agent}.log"
    lines = []
    for entry in map(json.loads, path.read_text().splitlines()):
        msg = entry.get("msg", "")
        if entry.get("task") == task_id and entry.get("event") == "session-output" and msg.startswith("stdout: "):
            lines.append(msg[len("stdout: "):])
    return lines


def escape_report(swarm: Swarm, agent: str, task_id: str) -> dict[str, Any]:
    report = {}
    for line in session_lines(swarm, agent, task_id):
        obj = json.loads(line)
        if obj.get("type") == "escape":
            report[obj["attempt"]] = obj["outcome"]
    assert "escape_control_stop" in report, f"incomplete escape report: {sorted(report)}"
    return report


def run_escape(swarm: Swarm, task_id: str, **words: str) -> tuple[str, dict[str, Any]]:
    """Run one escape task; return (agent that ran it, its report)."""
    agents = swarm.agents()
    pids = ",".join(str(agents[a]["pid"]) for a in AGENTS)
    prompt = " ".join([f"escape supervisor={swarm.proc.pid} daemons={pids} tag={task_id}"]  # type: ignore[union-attr]
                      + [f"{k}={v}" for k, v in words.items()])
    swarm.add_task(prompt, task_id)
    task = swarm.wait_tasks([task_id], ("done", "failed", "blocked"), timeout=TIMEOUT)[task_id]
    assert task["state"] == "done", task
    return task["agent"], escape_report(swarm, task["agent"], task_id)


def assert_confined(swarm: Swarm, report: dict[str, Any], task_id: str) -> None:
    escapes = {k: v for k, v in report.items() if k.startswith("escape_") and k != ORPHAN}
    worked = {k: v for k, v in escapes.items() if not str(v).startswith("denied")}
    assert worked == {}, f"escapes that worked: {worked}"
    legit = {k: v for k, v in report.items() if k.startswith("legit_")}
    assert legit and all(v == "ok" for v in legit.values()), legit
    assert report["open_fds"] == {}, f"descriptors leaked into the session: {report['open_fds']}"
    home = swarm.home
    assert not (home / f"escaped-{task_id}.txt").exists() and not (home / "moved-out").exists()
    assert not Path(f"/tmp/escaped-{task_id}.txt").exists()
    # The refused control requests changed nothing, and the owner's CLI still works.
    tasks = swarm.tasks()
    assert f"pwned-{task_id}" not in tasks, sorted(tasks)
    snap = swarm.status()
    assert snap["supervisor"]["desired"] == 2 and len(snap["agents"]) == 2
    refused = [e for e in map(json.loads, (home / ".agentctl/logs/supervisor.log").read_text().splitlines())
               if "control connection refused" in e.get("msg", "")]
    reached = [k for k, v in report.items() if k.startswith("escape_control") and k != ORPHAN
               and not str(v).startswith("denied: ENOENT")]  # bwrap hides the socket
    assert len(refused) >= len(reached), f"refusals not logged: {reached} vs {refused}"


def bwrap_problem() -> str | None:
    return None if sandbox.bwrap_usable() else "bwrap cannot build a sandbox on this machine"


def landlock_problem() -> str | None:
    return None if sandbox.landlock_abi() >= 1 else "this kernel has no Landlock"


# ----------------------------------------------------------------- as root

@pytest.fixture
def root_swarm(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Swarm]:
    kind = request.param
    problem = bwrap_problem() if kind == "bwrap" else landlock_problem()
    if problem:
        pytest.skip(problem)
    home = tmp_path / "home"
    plant_credentials(home)
    config = swarm_config(escape_command(sys.executable, ESCAPE_AGENT, home), home, kind)
    # A real notify socket too: the supervisor uses NOTIFY_SOCKET, no session may see it.
    # It is drained as systemd would: the supervisor's notify send blocks on a full queue.
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(tmp_path / "notify.sock"))
        threading.Thread(target=_drain, args=(notify,), daemon=True).start()
        env = {**LEAKY_ENV, "NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
        with Swarm(home, config, extra_env=env) as swarm:
            yield swarm


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass


@pytest.mark.parametrize("root_swarm", ["auto", "bwrap"], indirect=True)
def test_root_sessions_cannot_escape(root_swarm: Swarm) -> None:
    snap = root_swarm.start(timeout=TIMEOUT).status()
    kind = root_swarm.config["sandbox"]
    assert snap["supervisor"]["sandbox"].startswith("landlock" if kind == "auto" else "bwrap"), snap["supervisor"]
    plant_symlinks(root_swarm)
    agent, report = run_escape(root_swarm, "esc1")
    assert agent in AGENTS
    assert_confined(root_swarm, report, "esc1")
    assert not set(report["env_names"]) & (set(LEAKY_ENV) | {"NOTIFY_SOCKET"}), report["env_names"]
    # The swarm still works for its owner after all that.
    root_swarm.cli("task", "add", "again", "--id", "after-escape")
    assert root_swarm.wait_tasks(["after-escape"], timeout=TIMEOUT)["after-escape"]["state"] == "done"
    assert root_swarm.stop() == 0


def test_orphaned_session_descendant_cannot_use_the_control_socket(tmp_path: Path) -> None:
    if landlock_problem():
        pytest.skip(landlock_problem())
    home = tmp_path / "home"
    plant_credentials(home)
    config = swarm_config(escape_command(sys.executable, ESCAPE_AGENT, home), home, "landlock")
    with Swarm(home, config) as swarm:
        swarm.start(timeout=TIMEOUT)
        plant_symlinks(swarm)
        _, report = run_escape(swarm, "orph1")
        planted = "orphan-orph1" in swarm.tasks()
        swarm.cli("task", "cancel", "orphan-orph1", check=False)
        assert swarm.stop() == 0
    assert (report[ORPHAN], planted) == ("denied: EACCES", False), report[ORPHAN]


# ----------------------------------------------------------------- as a user

def test_user_sessions_cannot_escape(user_python: tuple[str, str], user_home: Path) -> None:  # noqa: F811
    if landlock_problem():
        pytest.skip(landlock_problem())
    python, fake = user_python
    agent_copy = Path(fake).parent / "escape_agent.py"
    shutil.copy(ESCAPE_AGENT, agent_copy)
    agent_copy.chmod(0o644)
    plant_credentials(user_home)
    config = swarm_config(escape_command(python, agent_copy, user_home), user_home, "auto")
    with UserSwarm(user_home, config, python) as swarm:
        snap = swarm.start(timeout=TIMEOUT).status()
        assert snap["supervisor"]["sandbox"].startswith("landlock"), snap["supervisor"]
        plant_symlinks(swarm)
        for path in (user_home / "ws").rglob("planted-link"):
            os.lchown(path, swarm.account.pw_uid, swarm.account.pw_gid)
        agent, report = run_escape(swarm, "uesc1")
        assert_confined(swarm, report, "uesc1")
        assert swarm.stop() == 0


# ----------------------------------------------------------------- secrets

def secrets_config(home: Path) -> dict[str, Any]:
    secret_dir = home / "secrets"
    secret_dir.mkdir(mode=0o700, parents=True)
    (secret_dir / "anthropic").write_text(API_KEY + "\n")
    (secret_dir / "token").write_text(FILE_SECRET + "\n")
    return {"secrets": [
        {"name": "anthropic", "file": str(secret_dir / "anthropic"), "env": "ANTHROPIC_API_KEY",
         "roles": ["builder"]},
        {"name": "deploy-token", "file": str(secret_dir / "token"), "path": ".secrets/token",
         "agents": ["swarm-builder-001"]},
    ], "roles": {"builder": 1, "general": 1}}


def test_secrets_reach_only_the_named_agent_and_never_logs(tmp_path: Path) -> None:
    if landlock_problem():
        pytest.skip(landlock_problem())
    home = tmp_path / "home"
    fake = [sys.executable, str(FAKE_CLAUDE), "-p", "--output-format", "stream-json", "--verbose"]
    config = base_config(count=2, agent={"command": fake}, **{"workspace-base": str(home / "ws")},
                         **secrets_config(home))
    loop = Loop()
    with Swarm(home, config, extra_env=LEAKY_ENV) as swarm:
        swarm.start(timeout=TIMEOUT)
        watcher = Peer(loop, swarm.status()["supervisor"]["agentchat_server"], "secret-watcher")
        swarm.add_task("report env [fake:env]", "env-b", role="builder")
        swarm.add_task("report env [fake:env]", "env-g", role="general")
        tasks = swarm.wait_tasks(["env-b", "env-g"], timeout=TIMEOUT)
        assert (tasks["env-b"]["agent"], tasks["env-g"]["agent"]) == ("swarm-builder-001", "swarm-general-001")
        builder = json.loads((home / "ws/swarm-builder-001/fake-env.json").read_text())
        general = json.loads((home / "ws/swarm-general-001/fake-env.json").read_text())
        assert builder["auth"]["ANTHROPIC_API_KEY"] is True
        assert general["auth"]["ANTHROPIC_API_KEY"] is False, "a secret reached a role it was not granted to"
        for names in (builder["names"], general["names"]):
            assert not set(names) & (set(LEAKY_ENV) - {"ANTHROPIC_API_KEY"}), names
        assert (home / "ws/swarm-builder-001/.secrets/token").read_text().strip() == FILE_SECRET
        assert not (home / "ws/swarm-general-001/.secrets/token").exists()
        # the task's state comes over IPC; its DONE line on the channel is paced and may trail it
        swarm.wait_for(lambda: any(c.startswith("DONE env-b") for c in watcher.contents()),
                       timeout=15, what="DONE env-b on the channel")
        watcher.close()
        loop.close()
        channel = watcher.contents()
        assert any(c.startswith("DONE env-b") for c in channel), channel
        seen = {"status": swarm.cli("swarm", "status", "--json").stdout,
                "task list": swarm.cli("task", "list", "--json").stdout, "channel": "\n".join(channel)}
        assert swarm.stop() == 0
    for path in (home / ".agentctl" / "logs").rglob("*"):
        if path.is_file():
            seen[str(path)] = path.read_text(errors="replace")
    for path in (home / "ws").rglob("context.md"):
        seen[str(path)] = path.read_text()
    seen["supervisor stderr"] = swarm.log_path.read_text(errors="replace")
    for where, text in seen.items():
        assert API_KEY not in text and FILE_SECRET not in text, f"a secret value leaked into {where}"


def test_granted_secret_file_is_readable_in_the_sandbox_others_are_not(tmp_path: Path) -> None:
    """The escape agent, as swarm-builder-001 under Landlock, can read its granted file
    through the link in its workspace; its sibling has no such file."""
    if landlock_problem():
        pytest.skip(landlock_problem())
    home = tmp_path / "home"
    plant_credentials(home)
    agents = ("swarm-builder-001", "swarm-general-001")
    command = escape_command(sys.executable, ESCAPE_AGENT, home, agents)
    config = swarm_config(command, home, "auto", **secrets_config(home))
    with Swarm(home, config) as swarm:
        swarm.start(timeout=TIMEOUT)
        plant_symlinks_for(swarm, agents)
        swarm.add_task(_escape_prompt(swarm, "sec-b", secret=".secrets/token"), "sec-b", role="builder")
        swarm.add_task(_escape_prompt(swarm, "sec-g", secret=".secrets/token"), "sec-g", role="general")
        swarm.wait_tasks(["sec-b", "sec-g"], timeout=TIMEOUT)
        builder = escape_report(swarm, "swarm-builder-001", "sec-b")
        general = escape_report(swarm, "swarm-general-001", "sec-g")
        assert builder["granted_secret_file"] == "ok"
        assert general["granted_secret_file"].startswith("denied: ENOENT"), general["granted_secret_file"]
        # The builder must not reach the secret's directory beyond the one file.
        assert_confined(swarm, builder, "sec-b")
        assert swarm.stop() == 0


def plant_symlinks_for(swarm: Swarm, names: tuple[str, ...]) -> None:
    for name in names:
        link = swarm.home / "ws" / name / "planted-link"
        os.symlink(swarm.home / ".ssh" / "id_ed25519", link)


def _escape_prompt(swarm: Swarm, tag: str, **words: str) -> str:
    pids = ",".join(str(a["pid"]) for a in swarm.agents().values())
    extra = " ".join(f"{k}={v}" for k, v in words.items())
    return f"escape supervisor={swarm.proc.pid} daemons={pids} tag={tag} {extra}"  # type: ignore[union-attr]


# ----------------------------------------------------------------- control socket

def test_control_socket_is_private_and_refuses_another_uid(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("switching to another uid needs root")
    home = tmp_path / "home"
    with Swarm(home, base_config(count=1, **{"workspace-base": str(home / "ws")})) as swarm:
        swarm.start(timeout=TIMEOUT)
        path = home / ".agentctl/run/control.sock"
        assert path.stat().st_mode & 0o777 == 0o600
        assert (home / ".agentctl/run").stat().st_mode & 0o777 == 0o700
        nobody = 65534
        pid = os.fork()
        if pid == 0:  # as nobody, with the path made reachable: the socket's mode still refuses
            try:
                os.setgid(nobody)
                os.setuid(nobody)
                s = socket.socket(socket.AF_UNIX)
                s.connect(str(path))
                os._exit(1)
            except PermissionError:
                os._exit(0)
            except BaseException:
                os._exit(2)
        assert os.waitpid(pid, 0)[1] >> 8 == 0, "another uid could connect to the control socket"
        assert swarm.cli("swarm", "status").returncode == 0
        assert swarm.stop() == 0


# ----------------------------------------------------------------- the workspace's .git

HOOK = """#!/bin/sh
# Planted by a session (its workspace is writable). Runs when the daemon checks out
# the next task's branch: in the daemon's context, not the session's sandbox.
cat "{home}/.ssh/id_ed25519" > "{ws}/stolen-key" 2>/dev/null
daemon=$(cut -d' ' -f4 /proc/$PPID/stat)
tr '\\0' '\\n' < /proc/$daemon/environ > "{ws}/daemon-environ" 2>/dev/null
exit 0
"""


def plant_git_hook(ws: Path, home: Path) -> None:
    """What any session can do in its own workspace: make it a repository with a hook."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(ws), "GIT_CONFIG_NOSYSTEM": "1"}
    subprocess.run(["git", "-C", str(ws), "init", "-q"], check=True, env=env, timeout=30)
    subprocess.run(["git", "-C", str(ws), "-c", "user.name=x", "-c", "user.email=x@x", "commit", "-q",
                    "--allow-empty", "-m", "init"], check=True, env=env, timeout=30)
    hook = ws / ".git" / "hooks" / "post-checkout"
    hook.write_text(HOOK.format(home=home, ws=ws))
    hook.chmod(0o755)


@pytest.mark.parametrize("kind", [
    "landlock",  # the daemon confines itself: the hook runs, but inside the daemon's domain
    "bwrap",
])
def test_hooks_planted_in_the_workspace_do_not_run_outside_the_sandbox(tmp_path: Path, kind: str) -> None:
    problem = bwrap_problem() if kind == "bwrap" else landlock_problem()
    if problem:
        pytest.skip(problem)
    home = tmp_path / "home"
    plant_credentials(home)
    config = base_config(count=1, sandbox=kind, **{"workspace-base": str(home / "ws")})
    with Swarm(home, config, extra_env=LEAKY_ENV) as swarm:
        swarm.start(timeout=TIMEOUT)
        ws = home / "ws" / "swarm-general-001"
        plant_git_hook(ws, home)
        swarm.add_task("anything [fake:success]", "after-hook")
        assert swarm.wait_tasks(["after-hook"], timeout=TIMEOUT)["after-hook"]["state"] == "done"
        assert "swarm/swarm-general-001/after-hook" in subprocess.run(
            ["git", "-C", str(ws), "branch"], capture_output=True, text=True, timeout=30).stdout
        stolen = (ws / "stolen-key").read_text() if (ws / "stolen-key").exists() else ""
        environ = (ws / "daemon-environ").read_text() if (ws / "daemon-environ").exists() else ""
        assert swarm.stop() == 0  # (tears the workspace down)
    assert "planted-ssh-key" not in stolen, "a planted hook read ~/.ssh outside the sandbox"
    leaked = [k for k in LEAKY_ENV if f"{k}=" in environ]
    assert leaked == [], f"a planted hook read the supervisor's environment: {leaked}"


@pytest.mark.parametrize("kind,spawn", [
    # the daemon is confined: placing the link out there is refused; the supervisor
    # hands it its ruleset through the fork-server, or on the exec'd command line
    ("landlock", "fork-server"),
    ("landlock", "exec"),
    ("bwrap", "fork-server"),
])
def test_secret_link_placement_does_not_follow_planted_symlinks(tmp_path: Path, kind: str,
                                                                spawn: str) -> None:
    problem = bwrap_problem() if kind == "bwrap" else landlock_problem()
    if problem:
        pytest.skip(problem)
    home = tmp_path / "home"
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = tmp_path / "token"
    secret.write_text(FILE_SECRET)
    config = base_config(count=1, sandbox=kind, spawn=spawn, **{"workspace-base": str(home / "ws")}, secrets=[
        {"name": "tok", "file": str(secret), "path": ".secrets/token", "agents": ["swarm-general-001"]}])
    with Swarm(home, config) as swarm:
        swarm.start(timeout=TIMEOUT)
        ws = home / "ws" / "swarm-general-001"
        shutil.rmtree(ws / ".secrets", ignore_errors=True)
        os.symlink(outside, ws / ".secrets")  # what a session could leave behind
        swarm.add_task("anything [fake:success]", "placed")
        swarm.wait_tasks(["placed"], ("done", "failed"), timeout=TIMEOUT)
        assert swarm.stop() == 0
    assert sorted(p.name for p in outside.iterdir()) == [], "the daemon wrote outside the workspace"
