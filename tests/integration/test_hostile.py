"""Hostile peers against the embedded relay and a running swarm (issue 5).

Every peer here is real: a raw websocket or TCP connection, or an
``AgentChatClient`` with an identity of its own (never the coordinator's),
driven from a background event loop. After each attack the swarm must still
run (status answers, daemons idle and connected, a real task completes) and
``tasks.json``, ``budget.json`` and the desired count must not change in ways
the attacker could not cause legitimately.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Coroutine, TypeVar

import pytest

from tests import rawws
from agentctl_swarm.agentchat import protocol as p
from agentctl_swarm.agentchat.client import AgentChatClient, ChannelNotAllowed
from agentctl_swarm.agentchat.identity import Identity
from tests.swarmlib import Swarm, base_config

T = TypeVar("T")
TIMEOUT = 60.0
AGENT = "swarm-general-001"


# ----------------------------------------------------------------- peers

class Loop:
    """An asyncio loop in a daemon thread, so tests can drive peers synchronously."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Peer:
    """An identified agentchat client of its own; records every MSG it receives."""

    def __init__(self, loop: Loop, url: str, name: str, channels: tuple[str, ...] = ("#agents",)) -> None:
        self.loop = loop
        self.seen: list[dict[str, Any]] = []
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.identity = Identity.generate(name)

        async def make() -> AgentChatClient:
            client = AgentChatClient(url, self.identity, list(channels), on_message=self.seen.append,
                                     on_event=lambda e, d: self.events.append((e, d)), send_interval=0.0)
            asyncio.get_running_loop().create_task(client.run())
            assert await client.wait_connected(10.0), f"{name} could not connect"
            return client
        self.client = loop.run(make())

    def say(self, content: str, to: str = "#agents") -> None:
        async def send() -> None:
            self.client.send(to, content)
        self.loop.run(send())

    def contents(self) -> list[str]:
        return [str(m.get("content")) for m in list(self.seen)]

    def close(self) -> None:
        self.loop.run(self.client.close())


async def raw_identified(url: str, name: str, channel: str = "#agents") -> Any:
    """A raw websocket that completes the handshake, joins ``channel`` and returns."""
    ws = await rawws.connect(url, max_size=None, compression=None)
    identity = Identity.generate(name)
    await ws.send(p.encode({"type": p.IDENTIFY, "name": name, "pubkey": identity.pubkey_pem}))
    chal = json.loads(await ws.recv())
    ts = int(time.time() * 1000)
    await ws.send(p.encode({"type": p.VERIFY_IDENTITY, "challenge_id": chal["challenge_id"], "timestamp": ts,
                            "signature": identity.sign_auth(chal["nonce"], chal["challenge_id"], ts)}))
    assert json.loads(await ws.recv())["type"] == p.WELCOME
    await ws.send(p.encode({"type": p.JOIN, "channel": channel}))
    assert json.loads(await ws.recv())["type"] == p.JOINED
    return ws


# ----------------------------------------------------------------- the swarm

@pytest.fixture(scope="module")
def loop() -> Iterator[Loop]:
    lp = Loop()
    yield lp
    lp.close()


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    home = tmp_path_factory.mktemp("hostile") / "home"
    config = base_config(count=2, **{"max-active": 2, "workspace-base": str(home / "ws")})
    with Swarm(home, config) as s:
        s.start(timeout=TIMEOUT)
        yield s


def url_of(swarm: Swarm) -> str:
    return swarm.status()["supervisor"]["agentchat_server"]


def state_files(swarm: Swarm) -> dict[str, Any]:
    out = {}
    for name in ("tasks", "budget", "desired"):
        path = swarm.state_dir / f"{name}.json"
        out[name] = json.loads(path.read_text()) if path.exists() else None
    return out


def assert_healthy(swarm: Swarm, task_id: str) -> None:
    """Status answers, every daemon is idle and connected, and a real task still completes."""
    snap = swarm.wait_ready(TIMEOUT)
    assert all(a["restarts"] == 0 for a in snap["agents"]), snap["agents"]
    swarm.add_task("still working [fake:success]", task_id)
    assert swarm.wait_tasks([task_id], timeout=TIMEOUT)[task_id]["state"] == "done"


# ----------------------------------------------------------------- spoofing

def test_spoofed_assign_changes_nothing(swarm: Swarm, loop: Loop) -> None:
    swarm.add_task("nobody of this role runs here", "waits-qa", role="qa")
    before = state_files(swarm)
    spoofer = Peer(loop, url_of(swarm), "spoofer")
    try:
        spoofer.say(f"ASSIGN no-such-task {AGENT}")
        spoofer.say(f"ASSIGN waits-qa {AGENT}")
        spoofer.say(f"CLAIM waits-qa {AGENT}")  # claiming in a daemon's name
        spoofer.say(f"DONE waits-qa {AGENT} all done")
        spoofer.say("ASSIGN ../../etc/passwd swarm-general-002")
        time.sleep(1.5)
    finally:
        spoofer.close()
    agents = swarm.agents()
    assert all(a["status"] == "idle" and a["task"] is None for a in agents.values()), agents
    after = state_files(swarm)
    assert after == before, "a spoofed line changed the swarm's state"
    assert swarm.tasks()["waits-qa"]["state"] == "queued"
    spoofs = [e for e in map(json.loads, (swarm.home / ".agentctl/logs/agents" / f"{AGENT}.log")
                             .read_text().splitlines()) if e.get("event") == "spoof"]
    assert spoofs, "the daemon did not log the spoofed ASSIGN"
    swarm.cli("task", "cancel", "waits-qa")
    assert_healthy(swarm, "after-spoof")


def test_channel_tasks_for_absent_roles_do_not_block_the_swarm(swarm: Swarm, loop: Loop) -> None:
    """TASK lines anyone may post; unclaimable ones must not hold max-active slots for ever."""
    peer = Peer(loop, url_of(swarm), "squatter")
    try:
        for i in range(3):
            peer.say(f"TASK squat-{i} qa never claimed")
        time.sleep(1.0)
    finally:
        peer.close()
    swarm.add_task("real work [fake:success]", "behind-squatters")
    try:
        state = swarm.wait_tasks(["behind-squatters"], timeout=25)["behind-squatters"]["state"]
    finally:
        for i in range(3):
            swarm.cli("task", "cancel", f"squat-{i}", check=False)
    assert state == "done"


# ----------------------------------------------------------------- floods and garbage

def test_flood_is_rate_limited_and_swarm_keeps_heartbeating(swarm: Swarm, loop: Loop) -> None:
    before = state_files(swarm)

    async def flood() -> int:
        ws = await raw_identified(url_of(swarm), "flooder")
        limited = 0
        for i in range(2000):
            await ws.send(p.encode({"type": p.MSG, "to": "#agents", "content": f"HEARTBEAT flood {i}"}))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                frame = json.loads(await asyncio.wait_for(ws.recv(), 1.0))
            except asyncio.TimeoutError:
                break
            limited += frame.get("code") == p.RATE_LIMITED
        await ws.close()
        return limited
    limited = loop.run(flood(), timeout=60)
    assert limited > 1000, f"only {limited} of 2000 flood MSGs were rate-limited"
    snap = swarm.status()
    ages = [a["last_heartbeat_age_s"] for a in snap["agents"]]
    assert all(age is not None and age < 3 * 2.0 for age in ages), ages
    assert state_files(swarm) == before
    assert_healthy(swarm, "after-flood")


def test_garbage_frames_oversized_and_invalid_utf8(swarm: Swarm, loop: Loop) -> None:
    url = url_of(swarm)
    before = state_files(swarm)

    async def garbage() -> list[Any]:
        results: list[Any] = []
        ws = await raw_identified(url, "garbage")
        for frame in (b"\xff\xfe\xc3(", "not json {", "[1,2,3]", '{"type": 7}', '{"type":"MSG"}',
                      json.dumps({"type": "MSG", "to": "#agents", "content": {"nested": True}}),
                      json.dumps({"type": "MSG", "to": "#agents", "content": "TASK ../x any \x00\x1b[2J"}),
                      json.dumps({"type": "MSG", "to": "#agents", "content": "ASSIGN " + "a" * 100000}),
                      json.dumps({"type": "MSG", "to": "#agents", "content": "\udcff".encode(
                          "utf-8", "surrogatepass").decode("latin-1")})):
            await ws.send(frame)
            await asyncio.sleep(0.05)
        await ws.close()
        big = await rawws.connect(url, max_size=None, compression=None)
        try:
            await big.send("x" * (p.MAX_FRAME_BYTES + 1024))
            await asyncio.wait_for(big.recv(), 5)
        except rawws.ConnectionClosed as exc:
            results.append(rawws.close_code(exc))
        return results
    codes = loop.run(garbage(), timeout=60)
    assert codes == [p.CLOSE_TOO_BIG], codes
    assert state_files(swarm) == before
    assert_healthy(swarm, "after-garbage")


def test_half_open_connections_and_stalled_readers(swarm: Swarm, loop: Loop) -> None:
    host, port = url_of(swarm).removeprefix("ws://").rsplit(":", 1)
    silent = [socket.create_connection((host, int(port)), timeout=5) for _ in range(50)]
    partial = [socket.create_connection((host, int(port)), timeout=5) for _ in range(20)]
    for s in partial:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")  # never finishes
    stalled = [loop.run(raw_identified(url_of(swarm), f"stalled-{i}")) for i in range(5)]
    try:
        # The stalled peers never call recv: websockets stops reading after max_queue frames,
        # then the kernel buffers fill while the swarm keeps talking on #agents.
        assert_healthy(swarm, "during-half-open")
        swarm.add_task("second [fake:success]", "during-half-open-2")
        assert swarm.wait_tasks(["during-half-open-2"], timeout=TIMEOUT)
    finally:
        for s in silent + partial:
            s.close()
        for ws in stalled:
            loop.run(ws.close())
    assert swarm.status()["supervisor"]["relay_pid"] is not None


# ----------------------------------------------------------------- channels

def test_swarm_speaks_only_on_its_channels(swarm: Swarm, loop: Loop) -> None:
    url = url_of(swarm)
    other = Peer(loop, url, "watch-other", ("#other",))
    work = Peer(loop, url, "watch-agents", ("#agents",))
    try:
        swarm.add_task("talk [fake:slow:1:3]", "chatty")
        swarm.wait_tasks(["chatty"], timeout=TIMEOUT)
        # The supervisor hears of the end over IPC; the DONE line follows on the channel.
        swarm.wait_for(lambda: any(c.startswith("DONE chatty") for c in work.contents()),
                       timeout=10, what="DONE chatty on #agents")
        time.sleep(0.5)  # time for anything that would (wrongly) go to #other
    finally:
        other.close()
        work.close()
    assert any(c.startswith("DONE chatty") for c in work.contents()), work.contents()
    assert other.seen == [], f"the swarm spoke on #other: {other.contents()}"


def test_send_to_a_foreign_channel_is_refused_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    """ChannelNotAllowed itself is tested in test_agentchat_client.py; the issue also
    asks that the refusal be logged."""
    client = AgentChatClient("ws://127.0.0.1:9", Identity.generate("x"), ["#agents"],
                             on_message=lambda m: None)
    with caplog.at_level(logging.WARNING), pytest.raises(ChannelNotAllowed):
        client.send("#other", "hello")
    assert any("#other" in r.getMessage() for r in caplog.records), \
        "a refused send to a foreign channel was not logged"


def test_an_undrained_notify_socket_does_not_hang_the_supervisor(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(tmp_path / "notify.sock"))  # bound, never read
        config = base_config(count=1, **{"workspace-base": str(home / "ws")})
        with Swarm(home, config, extra_env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock")}) as swarm:
            swarm.start(wait_ready=False)
            time.sleep(12.0)  # a loop tick a second, a WATCHDOG=1 each: more than the queue holds
            try:
                answer = swarm.cli("swarm", "status", "--json", timeout=10)
            except subprocess.TimeoutExpired:
                swarm.kill()  # hung: SIGTERM would never be handled
                raise
            assert json.loads(answer.stdout)["supervisor"]["pid"] == swarm.proc.pid  # type: ignore[union-attr]
