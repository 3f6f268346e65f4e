"""AgentChatClient against the real embedded relay on loopback."""
from __future__ import annotations

import asyncio
import functools
import json
import socket
import time

import pytest
from tests.rawws import serve

from agentctl_swarm.agentchat import _ws
from agentctl_swarm.agentchat.client import AgentChatClient, ChannelNotAllowed, default_backoff
from agentctl_swarm.agentchat.identity import Identity
from agentctl_swarm.agentchat.relay import Relay


def arun(timeout: float = 30):
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            return asyncio.run(asyncio.wait_for(fn(*args, **kwargs), timeout))
        return wrapper
    return deco


class Probe:
    """Records what a client reports; lets a test wait for a condition without polling."""

    def __init__(self) -> None:
        self.messages: list[dict] = []
        self.events: list[tuple[str, dict]] = []
        self.changed = asyncio.Event()

    def on_message(self, msg: dict) -> None:
        self.messages.append(msg)
        self.changed.set()

    def on_event(self, event: str, data: dict) -> None:
        self.events.append((event, data))
        self.changed.set()

    def contents(self) -> list[str]:
        return [m["content"] for m in self.messages]

    def named(self, event: str) -> list[dict]:
        return [d for e, d in self.events if e == event]

    async def until(self, cond, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not cond():
                self.changed.clear()
                await self.changed.wait()


def make_client(url: str, name: str, probe: Probe, **kw) -> AgentChatClient:
    kw.setdefault("channels", ["#agents"])
    return AgentChatClient(url, Identity.generate(name), on_message=probe.on_message,
                           on_event=probe.on_event, **kw)


async def running(*clients: AgentChatClient) -> list[asyncio.Task]:
    tasks = [asyncio.create_task(c.run()) for c in clients]
    for client in clients:
        assert await client.wait_connected(10), "client never connected"
    return tasks


async def shutdown(clients, tasks) -> None:
    for client in clients:
        await client.close()
    for task in tasks:
        await asyncio.wait_for(task, 5)  # run() returns cleanly after close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_default_backoff_doubles_to_thirty() -> None:
    assert [default_backoff(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 30, 30, 30]


@arun()
async def test_two_clients_exchange_messages() -> None:
    relay = Relay(rate_limit=0)
    await relay.start()
    pa, pb = Probe(), Probe()
    a = make_client(relay.url, "alice", pa, send_interval=0.01)
    b = make_client(relay.url, "bob", pb, send_interval=0.01)
    tasks = await running(a, b)
    assert a.agent_id == a._identity.agent_id and a.connected and not a.lurk
    a.send("#agents", "hello bob")
    b.send("#agents", "hello alice")
    await pb.until(lambda: pb.contents() == ["hello bob"])
    await pa.until(lambda: pa.contents() == ["hello alice"])
    assert pb.messages[0]["from"] == a.agent_id and pb.messages[0]["to"] == "#agents"
    await asyncio.sleep(0.1)
    assert pa.contents() == ["hello alice"]  # own echoes are not delivered
    assert a.queued == 0 and b.queued == 0
    assert pa.named("connected") == [{"agent_id": a.agent_id, "lurk": False,
                                      "lurk_until": None}]
    await shutdown([a, b], tasks)
    await relay.stop()


@arun()
async def test_paced_sending_under_rate_limit_one_delivers_all_in_order() -> None:
    relay = Relay(rate_limit=1.0)
    await relay.start()
    ps, pr = Probe(), Probe()
    sender = make_client(relay.url, "sender", ps, send_interval=1.0)
    reader = make_client(relay.url, "reader", pr)
    tasks = await running(sender, reader)
    start = time.monotonic()
    for i in range(3):
        sender.send("#agents", f"m{i}")
    assert sender.queued == 3
    await pr.until(lambda: len(pr.messages) == 3)
    elapsed = time.monotonic() - start
    assert pr.contents() == ["m0", "m1", "m2"]
    assert 2.0 <= elapsed < 4.0, elapsed
    assert relay.stats()["errors_sent"] == 0  # paced from the echo: never refused
    await shutdown([sender, reader], tasks)
    await relay.stop()


@arun()
async def test_a_backlog_is_not_slowed_by_the_read_gap() -> None:
    """Daemons read with a 0.25 s gap; each MSG waits for the echo of the one before,
    so a gap on every echo would hold a DONE behind its STATUS lines (a CI failure)."""
    relay = Relay(rate_limit=0)
    await relay.start()
    ps, pr = Probe(), Probe()
    sender = make_client(relay.url, "sender", ps, send_interval=0.0, read_gap=1.0, keepalive=None)
    reader = make_client(relay.url, "reader", pr)
    tasks = await running(sender, reader)
    await asyncio.sleep(1.1)  # the handshake's reads are well in the past
    start = time.monotonic()
    for i in range(6):
        sender.send("#agents", f"m{i}")
    await pr.until(lambda: len(pr.messages) == 6)
    while sender.queued or sender._inflight is not None:
        await asyncio.sleep(0.01)
    elapsed = time.monotonic() - start
    assert pr.contents() == [f"m{i}" for i in range(6)]
    assert elapsed < 0.9, f"six MSGs took {elapsed:.2f}s: the sender waited out its read gap"
    # and the gap is back for what follows: two frames close together pause the reader
    assert sender._ws.read_gap == 1.0
    await shutdown([sender, reader], tasks)
    await relay.stop()


@arun()
async def test_rate_limited_msgs_are_resent_never_lost_or_reordered() -> None:
    relay = Relay(rate_limit=5.0)  # 200 ms between MSGs
    await relay.start()
    ps, pr = Probe(), Probe()
    sender = make_client(relay.url, "hasty", ps, send_interval=0.02)  # too fast on purpose
    reader = make_client(relay.url, "reader", pr)
    tasks = await running(sender, reader)
    for i in range(6):
        sender.send("#agents", f"m{i}")
    await pr.until(lambda: len(pr.messages) >= 6)
    await asyncio.sleep(0.3)
    assert pr.contents() == [f"m{i}" for i in range(6)]
    assert relay.stats()["errors_sent"] > 0  # refusals happened and were absorbed
    assert ps.named("send_refused") == [] and sender.queued == 0
    await shutdown([sender, reader], tasks)
    await relay.stop()


@arun()
async def test_reconnects_after_relay_restart_rejoins_and_flushes_in_order() -> None:
    relay = Relay(rate_limit=0)
    port = await relay.start()
    pc, po = Probe(), Probe()
    client = make_client(relay.url, "survivor", pc, send_interval=0.01,
                         backoff=lambda n: 0.4)
    tasks = await running(client)
    await relay.stop()
    await pc.until(lambda: pc.named("disconnected"))
    assert not client.connected
    for i in range(4):
        client.send("#agents", f"queued-{i}")
    assert client.queued == 4
    relay = Relay(port=port, rate_limit=0)
    await relay.start()
    observer = make_client(relay.url, "observer", po)
    tasks += await running(observer)
    await po.until(lambda: len(po.messages) >= 4)
    assert po.contents() == [f"queued-{i}" for i in range(4)]
    assert len(pc.named("connected")) == 2 and client.connected
    assert relay.stats()["channels"] == {"#agents": 2}  # re-joined
    await shutdown([client, observer], tasks)
    await relay.stop()


@arun()
async def test_reconnect_failed_reported_after_every_fifth_failure() -> None:
    probe = Probe()
    client = make_client(f"ws://127.0.0.1:{free_port()}", "lonely", probe,
                         backoff=lambda n: 0.01, report_after=5)
    task = asyncio.create_task(client.run())
    await probe.until(lambda: len(probe.named("reconnect_failed")) >= 2)
    assert probe.named("reconnect_failed")[:2] == [{"attempts": 5}, {"attempts": 10}]
    assert not client.connected and probe.named("connected") == []
    await client.close()
    await asyncio.wait_for(task, 5)


@arun()
async def test_channel_not_allowed() -> None:
    probe = Probe()
    client = make_client("ws://127.0.0.1:1", "picky", probe)
    with pytest.raises(ChannelNotAllowed):
        client.send("#elsewhere", "x")
    with pytest.raises(ChannelNotAllowed):
        client.send("@0123456789abcdef", "x")
    assert client.queued == 0
    direct = make_client("ws://127.0.0.1:1", "direct", probe, allow_direct=True)
    direct.send("@0123456789abcdef", "x")
    direct.send("#agents", "y")
    assert direct.queued == 2
    with pytest.raises(ValueError):
        make_client("ws://127.0.0.1:1", "bad", probe, channels=["agents"])


@arun()
async def test_lurk_relay_refusal_becomes_send_refused_event() -> None:
    relay = Relay(lurk=True, rate_limit=0)
    await relay.start()
    probe = Probe()
    client = make_client(relay.url, "newbie", probe, send_interval=0.01)
    tasks = await running(client)
    assert client.lurk is True
    assert probe.named("connected")[0]["lurk"] is True
    client.send("#agents", "let me talk")
    await probe.until(lambda: probe.named("send_refused"))
    refused = probe.named("send_refused")[0]
    assert refused["to"] == "#agents" and refused["code"] == "LURK_MODE" and refused["message"]
    assert client.queued == 0  # refused, not stuck
    await shutdown([client], tasks)
    await relay.stop()


@arun()
async def test_malformed_frames_from_the_server_are_ignored() -> None:
    """A hostile server: garbage frames must be logged and skipped, never break run()."""
    ident = Identity.generate("robust")

    async def handler(ws) -> None:
        json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "CHALLENGE", "challenge_id": "c", "nonce": "n",
                                  "expires_at": 0}))
        json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "WELCOME", "agent_id": ident.agent_id, "name": "r"}))
        json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "JOINED", "channel": "#agents", "agents": []}))
        for junk in ("not json", "[1]", b"\xff\xfe", '{"type": "MSG"}', '{"no": "type"}'):
            await ws.send(junk)
        await ws.send(json.dumps({"type": "MSG", "from": "@x", "to": "#agents",
                                  "content": "still alive"}))
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        probe = Probe()
        client = AgentChatClient(f"ws://127.0.0.1:{port}", ident, ["#agents"],
                                 on_message=probe.on_message, on_event=probe.on_event)
        task = asyncio.create_task(client.run())
        await probe.until(lambda: "still alive" in [m.get("content") for m in probe.messages])
        assert client.connected and not task.done()
        await client.close()
        await asyncio.wait_for(task, 5)


@arun(timeout=60)
async def test_two_hundred_clients_connect_identify_and_join() -> None:
    relay = Relay()
    await relay.start()
    probe = Probe()
    idents = [Identity.generate(f"swarm-general-{i:03d}") for i in range(200)]
    clients = [AgentChatClient(relay.url, ident, ["#agents"], on_message=probe.on_message)
               for ident in idents]
    start = time.monotonic()
    tasks = [asyncio.create_task(c.run()) for c in clients]
    ok = await asyncio.gather(*(c.wait_connected(30) for c in clients))
    elapsed = time.monotonic() - start
    print(f"\n200 clients connected+identified+joined in {elapsed:.2f} s "
          f"({200 / elapsed:.0f} handshakes/s)")
    assert all(ok)
    assert relay.stats()["identified"] == 200
    assert relay.stats()["channels"] == {"#agents": 200}
    assert elapsed < 20
    await shutdown(clients, tasks)
    await relay.stop()


@arun()
async def test_ignore_heartbeats_asks_a_relay_that_offers_it_to_mute_them() -> None:
    for offers in (True, False):  # False: a server without the extension, like the real one
        relay = Relay(rate_limit=0, mute=offers)
        await relay.start()
        pd, pt = Probe(), Probe()
        daemon = make_client(relay.url, "swarm-general-001", pd, send_interval=0.01,
                             ignore_heartbeats=True)
        talker = make_client(relay.url, "talker", pt, send_interval=0.01)
        tasks = await running(daemon, talker)
        assert bool(relay._muted) is offers
        talker.send("#agents", "HEARTBEAT talker idle")
        talker.send("#agents", "TASK t-1 any build it")
        daemon.send("#agents", "HEARTBEAT swarm-general-001 idle")  # settles on its echo either way
        await pd.until(lambda: pd.contents() == ["TASK t-1 any build it"])
        await pt.until(lambda: pt.contents() == ["HEARTBEAT swarm-general-001 idle"])
        await asyncio.sleep(0.1)
        assert daemon.queued == 0 and pd.contents() == ["TASK t-1 any build it"]
        fanned = relay.stats()["frames_fanned_out"]
        assert fanned == (5 if offers else 6)  # muted: the talker's beat never went to the daemon
        await shutdown([daemon, talker], tasks)
        await relay.stop()


def test_the_coordinator_is_not_sent_the_daemons_heartbeats(tmp_path) -> None:
    """The supervisor's coordinator learns liveness over IPC, not from the channel: it
    asks the relay not to send it HEARTBEATs (1000 daemons beat 1000 times an interval),
    and still takes every other line."""
    from types import SimpleNamespace

    from agentctl_swarm import coordinator as coord
    from agentctl_swarm.config import load_config
    from agentctl_swarm.paths import SwarmPaths

    @arun()
    async def scenario() -> None:
        relay = Relay(rate_limit=0)
        await relay.start()
        paths = SwarmPaths(tmp_path / ".agentctl")
        paths.ensure()
        sup = SimpleNamespace(paths=paths, config=load_config(None, env={}, home=tmp_path),
                              slots={}, stopping=False, relay_url=relay.url)
        book = coord.Coordinator(sup)
        heard: list[str] = []
        book._on_chat = lambda frame: (heard.append(frame.get("content")), coord.Coordinator._on_chat(book, frame))
        await book.start()
        pt = Probe()
        talker = make_client(relay.url, "swarm-general-001", pt, send_interval=0.01)
        tasks = await running(talker)
        talker.send("#agents", "HEARTBEAT swarm-general-001 idle")
        talker.send("#agents", "TASK t-1 any build it")  # after the beat, on the same connection
        async with asyncio.timeout(10):
            while "t-1" not in book.tasks:
                await asyncio.sleep(0.01)
        assert heard == ["TASK t-1 any build it"]
        await shutdown([talker], tasks)
        await book.stop()
        await relay.stop()

    scenario()


@arun()
async def test_a_handed_over_connection_is_used_first_and_reconnects_are_the_clients_own() -> None:
    """A daemon's first relay connection is opened by its supervisor (_ws.open_upgraded)
    and handed over: the client identifies and joins on it without a connect of its
    own; after that connection is lost it connects by itself as usual."""
    relay = Relay(rate_limit=0)
    await relay.start()
    sock, uri, received = await _ws.open_upgraded(relay.url)
    await asyncio.sleep(0.05)
    assert relay.stats()["connections"] == 1  # the upgraded, not yet identified, connection
    probe = Probe()
    client = make_client(relay.url, "handed", probe, handover=(sock, uri, received))
    tasks = await running(client)
    assert relay.stats()["connections"] == 1, "the client opened a connection of its own"
    assert probe.named("connected")[0]["agent_id"] == client.agent_id
    client._ws.abort()  # the link drops: the next connection is the client's own
    await probe.until(lambda: len(probe.named("connected")) == 2, timeout=15)
    await shutdown([client], tasks)
    await relay.stop()
