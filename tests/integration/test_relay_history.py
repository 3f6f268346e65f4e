"""The embedded relay's channel history outlives the relay process (30-minute soak).

The soak lost a TASK posted on the channel in the instant the supervisor was
killed -9: the observer saw it, the coordinator never handled it, and the relay
(killed with its supervisor) took its history with it. The relay now appends
each channel MSG to a file before fanning it out, and its successor replays it.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agentctl_swarm.agentchat.client import AgentChatClient
from agentctl_swarm.agentchat.identity import Identity
from agentctl_swarm.agentchat.relay import HISTORY, ChannelHistory
from tests.integration.test_regressions import NEEDS_ROOT, _small_disk
from tests.swarmlib import Swarm, base_config, start_relay


async def _post(url: str, lines: list[str], name: str = "poster") -> None:
    """Send ``lines`` on #agents and return once the relay has echoed every one."""
    client = AgentChatClient(url, Identity.generate(name), ["#agents"], on_message=lambda m: None,
                             send_interval=0.0)
    task = asyncio.create_task(client.run())
    assert await client.wait_connected(10)
    for line in lines:
        client.send("#agents", line)
    async with asyncio.timeout(20):
        while client.queued or client._inflight is not None:
            await asyncio.sleep(0.01)
    await client.close()
    await task


async def _replayed(url: str) -> list[dict]:
    """What a joiner is replayed on #agents."""
    seen: list[dict] = []
    client = AgentChatClient(url, Identity.generate("joiner"), ["#agents"], on_message=seen.append,
                             deliver_replay=True)
    task = asyncio.create_task(client.run())
    assert await client.wait_connected(10)
    await asyncio.sleep(0.3)
    await client.close()
    await task
    return seen


def test_history_outlives_a_relay_killed_with_sigkill(tmp_path: Path) -> None:
    history, port_file = tmp_path / "history.jsonl", tmp_path / "port"
    relay = start_relay(port_file, "--history-file", str(history))
    try:
        url = f"ws://127.0.0.1:{port_file.read_text().strip()}"
        asyncio.run(_post(url, [f"line {i}" for i in range(HISTORY + 10)]))
    finally:
        relay.send_signal(signal.SIGKILL)
        relay.wait(10)
    relay = start_relay(port_file, "--history-file", str(history))
    try:
        url = f"ws://127.0.0.1:{port_file.read_text().strip()}"
        seen = asyncio.run(_replayed(url))
    finally:
        relay.terminate()
        relay.wait(10)
    assert [m["content"] for m in seen] == [f"line {i}" for i in range(10, HISTORY + 10)]
    assert all(m.get("replay") is True and m["to"] == "#agents" for m in seen)
    assert history.stat().st_mode & 0o777 == 0o600  # channel contents are private


def test_history_file_is_bounded_and_skips_torn_lines(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"

    def msg(channel: str, i: int) -> str:
        return json.dumps({"type": "MSG", "to": channel, "content": f"{channel} {i}", "replay": True})

    history = ChannelHistory(path, size=5)
    for i in range(200):
        history.add("#agents", msg("#agents", i))
        history.add("#ops", msg("#ops", i))
        assert len(path.read_text().splitlines()) <= 4 * 5 * 2 + 1, "the log grows without bound"
    history.close()
    with open(path, "a") as fh:  # a kill mid-write, and a line that is not a MSG
        fh.write('{"type": "MSG", "to": "#agents", "cont\n[]\n{"type": "PING"}\n')
    reloaded = ChannelHistory(path, size=5)
    for channel in ("#agents", "#ops"):
        contents = [json.loads(f[2:] if f[1] < 126 else f[4:])["content"] for f in reloaded.frames(channel)]
        assert contents == [f"{channel} {i}" for i in range(195, 200)]
    reloaded.close()
    assert len(path.read_text().splitlines()) == 10  # rewritten whole on load


@NEEDS_ROOT
def test_history_survives_a_full_disk(tmp_path: Path) -> None:
    with _small_disk(tmp_path) as (small, fill, free):
        path = small / "history.jsonl"
        history = ChannelHistory(path, size=5)
        history.add("#agents", json.dumps({"type": "MSG", "to": "#agents", "content": "before"}))
        fill()
        for i in range(3):  # refused by the disk: kept in memory, the relay goes on
            history.add("#agents", json.dumps({"type": "MSG", "to": "#agents", "content": f"full {i}"}))
        free()
        time.sleep(1.05)  # a failed history is rewritten at most once a second
        history.add("#agents", json.dumps({"type": "MSG", "to": "#agents", "content": "after"}))
        history.close()
        on_disk = [json.loads(line)["content"] for line in path.read_text().splitlines()]
        assert on_disk == ["before", "full 0", "full 1", "full 2", "after"]


def test_a_channel_task_the_coordinator_never_handled_survives_a_supervisor_kill(tmp_path: Path) -> None:
    """The soak's loss, made deterministic: the supervisor is stopped (its coordinator
    cannot read), a peer posts a TASK the relay accepts, then the supervisor is killed -9
    (its relay dies with it). The next supervisor must find and run the task."""
    with Swarm(tmp_path / "home", base_config(count=1)) as swarm:
        swarm.start()
        url = swarm.status()["supervisor"]["agentchat_server"]
        swarm.signal(signal.SIGSTOP)
        try:
            asyncio.run(_post(url, ["TASK posted-in-the-gap any the gap [fake:success]"]))
        finally:
            swarm.kill()  # still stopped: the coordinator never read the TASK
        saved = swarm.state_dir / "tasks.json"
        assert not saved.exists() or "posted-in-the-gap" not in saved.read_text()
        swarm.start()
        tasks = swarm.wait_tasks(["posted-in-the-gap"], timeout=60)
        assert tasks["posted-in-the-gap"]["state"] == "done"
