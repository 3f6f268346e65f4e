"""Regression tests for failures the fault-injection soak found (tests/soak)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from agentctl_swarm import ipc
from tests.swarmlib import Swarm, SwarmError, base_config, start_relay


def _log(swarm: Swarm) -> str:
    return (swarm.home / ".agentctl" / "logs" / "supervisor.log").read_text()


def test_ipc_handler_exception_keeps_the_channel() -> None:
    """Soak finding 1: an exception in a message handler closed the daemon's IPC channel."""
    seen: list[str] = []
    closed: list[object] = []

    def handler(msg: dict) -> None:
        seen.append(msg["t"])
        if msg["t"] == "boom":
            raise RuntimeError("handler bug")

    async def main() -> None:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        channel = await ipc.open_channel(ours, handler, closed.append)
        theirs.sendall(ipc.encode({"t": "boom"}) + ipc.encode({"t": "after"}))
        for _ in range(50):
            if len(seen) == 2:
                break
            await asyncio.sleep(0.01)
        assert channel.transport is not None and not channel.transport.is_closing()
        channel.close()
        theirs.close()

    asyncio.run(main())
    assert seen == ["boom", "after"] and closed in ([], [None])


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_full_state_disk_does_not_kill_daemons(tmp_path: Path) -> None:
    """Soak finding 1: with the state directory full, every finishing session killed its daemon."""
    swarm = Swarm(tmp_path / "home", base_config(count=1))
    state = swarm.state_dir
    state.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(state)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {mounted.stderr.strip()}")
    try:
        with swarm:
            swarm.start()
            swarm.add_task("work [fake:slow:3]", "full-1")
            swarm.wait_tasks(["full-1"], ("running",), timeout=30)
            filler = state / "filler"
            try:
                with open(filler, "wb") as fh:
                    while True:
                        fh.write(b"\0" * 4096)
                        fh.flush()
            except OSError:
                pass  # full: the session ends while nothing can be saved
            with pytest.raises(SwarmError, match="not added: state cannot be saved"):
                swarm.add_task("refused [fake:success]", "full-0")  # never acknowledged, so never lost
            time.sleep(0.5)
            for _ in range(2):
                task = swarm.wait_tasks(["full-1"], timeout=30)["full-1"]
            agent = swarm.agents()["swarm-general-001"]
            assert agent["restarts"] == 0 and agent["status"] == "idle", agent
            assert task["attempts"] == 0 and task["tokens"] > 0
            assert "not saved" in _log(swarm) or "cannot write state" in (swarm.log_path.read_text())
            filler.unlink(missing_ok=True)  # space is back: the next change is saved again
            swarm.add_task("again [fake:success]", "full-2")
            swarm.wait_tasks(["full-2"], timeout=30)
            saved = json.loads((state / "tasks.json").read_text())
            assert {t["id"] for t in saved["tasks"]} >= {"full-1", "full-2"}
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


def test_reload_with_vanished_config_keeps_the_old_one(tmp_path: Path) -> None:
    """Soak finding 2: SIGHUP with the config file gone silently loaded the defaults."""
    cfg = base_config(count=2, **{"max-active": 3, "persist": True})
    with Swarm(tmp_path / "home", cfg) as swarm:
        swarm.start()
        swarm.cli("swarm", "scale", "3")
        swarm.wait_for(lambda: len(swarm.agents()) == 3, 20, "3 daemons")
        swarm.config_path.unlink()
        result = swarm.cli("swarm", "reload", check=False)
        assert result.returncode == 1 and "old config kept" in result.stderr
        snap = swarm.status()["supervisor"]
        assert snap["max_active"] == 3 and snap["desired"] == 3
        assert "config reloaded" not in _log(swarm)


def test_unclaimed_channel_task_is_requeued(tmp_path: Path) -> None:
    """Soak finding 3: a TASK posted on the channel that nobody claimed held a slot forever."""
    from tests.integration.test_tasks import _raw_client
    with Swarm(tmp_path / "home", base_config(count=1)) as swarm:
        swarm.start()
        url = swarm.status()["supervisor"]["agentchat_server"]
        _raw_client(url, "poster", ["TASK ch-qa-1 qa nobody here has that role"])
        swarm.wait_for(lambda: swarm.tasks().get("ch-qa-1", {}).get("state") == "announced", 10, "seen")
        swarm.wait_for(lambda: swarm.tasks()["ch-qa-1"]["state"] == "queued", 20, "expiry")
        swarm.add_task("other work [fake:success]", "after-1")
        swarm.wait_tasks(["after-1"], timeout=30)


@pytest.mark.skipif(os.geteuid() != 0, reason="the cgroup-v1 memory controller is writable by root only")
def test_no_cgroup_left_after_stop(tmp_path: Path) -> None:
    """Soak finding 4: the swarm's cgroup base directory outlived the swarm."""
    cfg = base_config(count=2, agent={"memory-limit": "512M"})
    swarm = Swarm(tmp_path / "home", cfg)
    with swarm:
        swarm.start()
        detail = swarm.status()["supervisor"]["memory_enforcement_detail"]
        if "cgroup-v1" not in detail:
            pytest.skip(f"no cgroup-v1 memory controller here ({detail})")
        base = Path(detail.split(" at ", 1)[1])
        digest = hashlib.sha256(str(swarm.home / ".agentctl").encode()).hexdigest()[:10]
        assert base.name.endswith(digest) and (base / "swarm-general-001").is_dir()
    assert not base.exists()


def test_frozen_relay_is_noticed_and_survived(tmp_path: Path) -> None:
    """Soak finding 5: with the relay frozen, status kept saying every agent was connected."""
    cfg = base_config(count=2, **{"heartbeat-interval": "1s", "heartbeat-misses": 30})
    with Swarm(tmp_path / "home", cfg) as swarm:
        swarm.start()
        relay = swarm.status()["supervisor"]["relay_pid"]
        os.kill(relay, signal.SIGSTOP)
        try:
            swarm.wait_for(lambda: not any(a["connected"] for a in swarm.agents().values()), 30,
                           "agents to notice the frozen relay")
        finally:
            os.kill(relay, signal.SIGCONT)
        swarm.wait_for(lambda: all(a["connected"] for a in swarm.agents().values()), 60, "reconnect")
        swarm.add_task("after the outage [fake:success]", "thaw-1")
        swarm.wait_tasks(["thaw-1"], timeout=30)


def test_status_shows_a_starting_forkserver(tmp_path: Path) -> None:
    """Soak finding 6: a fork-server still preloading was missing from status."""
    with Swarm(tmp_path / "home", base_config(count=1)) as swarm:
        swarm.start()
        sup = swarm.status()["supervisor"]
        assert sup["forkserver_pid"] and sup["forkserver_ready"] is True
        os.kill(sup["forkserver_pid"], signal.SIGSTOP)  # frozen mid-life: still reported
        try:
            assert swarm.status()["supervisor"]["forkserver_pid"] == sup["forkserver_pid"]
        finally:
            os.kill(sup["forkserver_pid"], signal.SIGCONT)


def test_requested_sandbox_unavailable_refuses_sessions(tmp_path: Path) -> None:
    """sandbox: bwrap where bwrap cannot run: the swarm starts, every session refuses, with the reason."""
    import shutil
    import sys
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("git",):  # a PATH without bwrap
        os.symlink(shutil.which(tool), bindir / tool)
    cfg = base_config(count=1, sandbox="bwrap")
    swarm = Swarm(tmp_path / "home", cfg, extra_env={"PATH": f"{bindir}:{Path(sys.executable).parent}"})
    with swarm:
        swarm.start()
        assert swarm.status()["supervisor"]["sandbox"].startswith("unavailable (bwrap)")
        swarm.add_task("must not run unconfined [fake:success]", "nb-1")
        task = swarm.wait_tasks(["nb-1"], ("failed",), timeout=30)["nb-1"]
        assert task["reason"] == "sandbox-unavailable"
        workspace = Path(swarm.agents()["swarm-general-001"]["workspace"])
        assert not (workspace / "fake-output.txt").exists()  # the agent never ran
        assert "cannot be applied" in _log(swarm)


def test_finished_tasks_beyond_the_window_are_archived_not_lost(tmp_path: Path, monkeypatch) -> None:
    """30-minute soak: past 1000 finished tasks the oldest vanished from the list and the books."""
    from types import SimpleNamespace
    from agentctl_swarm import coordinator as coord
    from agentctl_swarm.config import load_config
    from agentctl_swarm.paths import SwarmPaths
    monkeypatch.setattr(coord, "KEEP_FINISHED", 3)
    paths = SwarmPaths(tmp_path / ".agentctl")
    paths.ensure()
    sup = SimpleNamespace(paths=paths, config=load_config(None, env={}, home=tmp_path), slots={},
                          stopping=False)
    book = coord.Coordinator(sup)  # no chat client: nothing is announced
    for i in range(8):
        record = book.add(f"task {i}", "any", f"arch-{i}")
        record.tokens = 100
        book._finish(record, "done", "")
    saved = json.loads(paths.state_file("tasks").read_text())["tasks"]
    assert len(saved) == 3
    everything = book.listing(include_archived=True)
    assert sorted(t["id"] for t in everything) == [f"arch-{i}" for i in range(8)]
    assert sum(t["tokens"] for t in everything) == 800


def test_workspaces_left_by_a_crashed_run_are_swept(tmp_path: Path) -> None:
    """30-minute soak: an agent retired just before a supervisor kill -9 left its workspace."""
    home = tmp_path / "home"
    base = home / "dev" / "claude"
    for name, swarm_id in (("swarm-general-099", str(home / ".agentctl")), ("someone-else", "/other")):
        (base / name).mkdir(parents=True)
        (base / name / ".agentctl-swarm").write_text(json.dumps(
            {"created_by": "agentctl-swarm", "name": name, "swarm": swarm_id}))
    (base / "mine-by-hand").mkdir()
    with Swarm(home, base_config(count=1)) as swarm:
        swarm.start()
        swarm.wait_for(lambda: not (base / "swarm-general-099").exists(), 10, "the sweep")
        assert (base / "someone-else").is_dir() and (base / "mine-by-hand").is_dir()
        assert (base / "swarm-general-001").is_dir()


@contextlib.contextmanager
def _small_disk(tmp_path: Path):
    """A 512 KiB tmpfs (root only): yields (the mount, fill(), free())."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(small)], check=True)
    filler = small / "filler"

    def fill() -> None:  # the disk is full to the last byte
        with open(filler, "wb", buffering=0) as fh:
            try:
                while True:
                    fh.write(b"\0" * 512)
            except OSError:
                pass

    try:
        yield small, fill, lambda: filler.unlink()
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def _book(root: Path, tmp_path: Path):
    from types import SimpleNamespace
    from agentctl_swarm import coordinator as coord
    from agentctl_swarm.config import load_config
    from agentctl_swarm.paths import SwarmPaths
    paths = SwarmPaths(root / ".agentctl")
    paths.ensure()
    sup = SimpleNamespace(paths=paths, config=load_config(None, env={}, home=tmp_path), slots={},
                          stopping=False)
    return coord.Coordinator(sup), paths


NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs to fill needs root")


@NEEDS_ROOT
def test_the_task_archive_is_all_or_nothing_on_a_full_disk(tmp_path: Path, monkeypatch) -> None:
    """30-minute soak: a short write on a full disk tore an archive line; its tasks were lost."""
    from agentctl_swarm import coordinator as coord
    monkeypatch.setattr(coord, "KEEP_FINISHED", 3)
    with _small_disk(tmp_path) as (small, fill, free):
        book, paths = _book(small, tmp_path)

        def finish(i: int) -> None:
            record = book.add(f"task {i} " + "p" * 1500, "any", f"full-{i}")
            record.tokens = 100
            book._finish(record, "done", "")

        for i in range(6):
            finish(i)
        fill()
        for i in range(6, 12):  # archive appends fail part-way; tasks.json cannot be saved
            book._on_task(coord.verbs.Task(f"full-{i}", "any", "from the channel"), "@peer")
            book._finish(book.tasks[f"full-{i}"], "done", "")
            book.tasks[f"full-{i}"].tokens = 100
        free()
        finish(12)  # space again: everything finished so far is archived
        archive = paths.state_file("tasks-archive").with_suffix(".jsonl")
        lines = archive.read_text().splitlines()
        assert all(json.loads(line)["id"].startswith("full-") for line in lines if line)
        listed = [t["id"] for t in book.listing(include_archived=True)]
        assert sorted(listed) == sorted(f"full-{i}" for i in range(13))
        assert sum(t["tokens"] for t in book.listing(include_archived=True)) == 1300


@NEEDS_ROOT
def test_a_task_that_cannot_be_saved_is_refused_and_state_is_saved_when_space_returns(
        tmp_path: Path) -> None:
    """30-minute soak: tasks acknowledged on a full disk were lost to a kill -9 soon after;
    the budget, saved only at the next session end, fell behind tasks.json."""
    from agentctl_swarm.coordinator import TaskError
    with _small_disk(tmp_path) as (small, fill, free):
        book, paths = _book(small, tmp_path)
        record = book.add("before", "any", "d-1")
        fill()
        with pytest.raises(TaskError, match="not added: state cannot be saved"):
            book.add("while full", "any", "d-2")
        assert "d-2" not in book.tasks  # nothing acknowledged, nothing half-there
        book.budget.add(500, 0.5)  # a session ended while the disk was full
        record.tokens = 500
        book._finish(record, "done", "")
        assert book.unsaved and book.budget.dirty
        free()
        book.save_pending()  # what the supervisor's loop does on every turn
        assert not book.unsaved and not book.budget.dirty
        saved = json.loads(paths.state_file("tasks").read_text())["tasks"]
        assert [(t["id"], t["state"], t["tokens"]) for t in saved] == [("d-1", "done", 500)]
        assert json.loads(paths.state_file("budget").read_text())["used"] == 500
        assert book.add("after", "any", "d-2").id == "d-2"


def _forkserver_children(sup_pid: int) -> list[int]:
    """The supervisor's fork-server processes (preloading or ready), from /proc."""
    from tests.soak.soak import children_of, cmdline
    return [p for p in children_of(sup_pid)
            if "agentctl_swarm.forkserver" in cmdline(p) or "fork-server" in cmdline(p)]


def test_a_forkserver_killed_while_preloading_is_restarted_by_the_policy(tmp_path: Path) -> None:
    """30-minute soak: the fork-server restarted after a kill -9 was killed again before its
    preload ended; the supervisor called that "failed to start" and stayed on exec for good,
    where the policy says: restart after 2 s."""
    with Swarm(tmp_path / "home", base_config(count=1)) as swarm:
        swarm.start()
        sup = swarm.proc.pid  # type: ignore[union-attr]
        first = swarm.status()["supervisor"]["forkserver_pid"]
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 10
        second = None
        while second is None and time.monotonic() < deadline:  # the restart, 1 s later
            second = next((p for p in _forkserver_children(sup) if p != first), None)
            time.sleep(0.005)
        assert second is not None, "the fork-server was not restarted after 1 s"
        os.kill(second, signal.SIGSTOP)  # caught while preloading: hold it there...
        assert swarm.status()["supervisor"]["forkserver_ready"] is False, \
            "too slow to catch the fork-server before its preload ended"
        os.kill(second, signal.SIGKILL)  # ...and kill it before it is ready
        swarm.wait_for(lambda: (s := swarm.status()["supervisor"])["forkserver_ready"]
                       and s["forkserver_pid"] not in (first, second), 15, "a third fork-server, ready")
        assert "restarting in 2s" in _log(swarm), "the early death did not go through the restart policy"
        swarm.cli("swarm", "scale", "2")  # and daemons come from it again
        swarm.wait_for(lambda: (a := swarm.agents().get("swarm-general-002")) and a["connected"], 20,
                       "a second daemon")
        assert swarm.agents()["swarm-general-002"]["spawned_via"] == "fork-server"


def test_the_first_daemons_wait_for_the_preloading_forkserver(tmp_path: Path) -> None:
    """The swarm's daemons are prepared while the fork-server preloads (Supervisor.boot),
    and the spawner holds them until it is ready: none is exec'd for being early. With a
    relay of its own the supervisor does not wait for one to start, so its first spawns
    come well before the preload ends (as in the benchmark)."""
    relay = start_relay(tmp_path / "relay.port")
    try:
        url = f"ws://127.0.0.1:{(tmp_path / 'relay.port').read_text().strip()}"
        with Swarm(tmp_path / "home", base_config(count=6, agentchat={"server": url})) as swarm:
            swarm.start()
            assert {a["spawned_via"] for a in swarm.agents().values()} == {"fork-server"}
            assert "using exec" not in _log(swarm)
    finally:
        relay.terminate()
        relay.wait(10)


def test_a_forkserver_stuck_in_its_preload_delays_the_start_at_most_two_seconds(tmp_path: Path) -> None:
    """A fork-server that never finishes its preload must not hold the swarm: the held
    starts give up on it together after FORKSERVER_WORTH_WAITING and are exec'd; once it
    is ready, new daemons come from it again."""
    from agentctl_swarm.spawner import FORKSERVER_WORTH_WAITING
    with Swarm(tmp_path / "home", base_config(count=3)) as swarm:
        t0 = time.monotonic()
        swarm.start(wait_ready=False)
        sup = swarm.proc.pid  # type: ignore[union-attr]
        stuck = None
        while stuck is None and time.monotonic() - t0 < 10:
            stuck = next(iter(_forkserver_children(sup)), None)
            time.sleep(0.002)
        assert stuck is not None, "no fork-server appeared"
        os.kill(stuck, signal.SIGSTOP)
        try:
            snap = swarm.wait_ready(timeout=20)
            took = time.monotonic() - t0
            assert snap["supervisor"]["forkserver_ready"] is False, \
                "too slow to catch the fork-server before its preload ended"
            assert {a["spawned_via"] for a in snap["agents"]} == {"exec"}
            assert took < FORKSERVER_WORTH_WAITING + 8, f"ready after {took:.1f} s"
            assert _log(swarm).count(f"fork-server {stuck} not ready after 2 s; daemons are exec'd") == 1
        finally:
            os.kill(stuck, signal.SIGCONT)
        swarm.wait_for(lambda: swarm.status()["supervisor"]["forkserver_ready"], 15, "the fork-server")
        swarm.cli("swarm", "scale", "4")
        swarm.wait_for(lambda: (a := swarm.agents().get("swarm-general-004")) and a["connected"], 20,
                       "a fourth daemon")
        assert swarm.agents()["swarm-general-004"]["spawned_via"] == "fork-server"
