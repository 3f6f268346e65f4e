"""The embedded relay driven by a raw WebSocket client through the exact frames."""
from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from tests.rawws import connect
from tests.rawws import ConnectionClosed, send_text_bytes

from agentctl_swarm.agentchat import protocol as p
from agentctl_swarm.agentchat.identity import Identity
from agentctl_swarm.agentchat.relay import Relay


def arun(fn):
    """Run an async test in a fresh loop with an overall timeout."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 30))
    return wrapper


async def started(**kw) -> Relay:
    relay = Relay(**kw)
    await relay.start()
    return relay


async def raw(relay: Relay):
    return await connect(relay.url, compression=None, max_size=None)


async def send(ws, msg: dict) -> None:
    await ws.send(json.dumps(msg))


async def recv(ws, timeout: float = 5.0) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def nothing_within(ws, seconds: float) -> bool:
    try:
        await asyncio.wait_for(ws.recv(), seconds)
    except TimeoutError:
        return True
    return False


async def closed_code(ws, timeout: float = 5.0) -> int | None:
    try:
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd else None


async def identify(ws, ident: Identity) -> dict:
    await send(ws, {"type": "IDENTIFY", "name": ident.name, "pubkey": ident.pubkey_pem})
    chal = await recv(ws)
    assert chal["type"] == "CHALLENGE"
    stamp = int(time.time() * 1000)
    sig = ident.sign_auth(chal["nonce"], chal["challenge_id"], stamp)
    await send(ws, {"type": "VERIFY_IDENTITY", "challenge_id": chal["challenge_id"],
                    "signature": sig, "timestamp": stamp})
    return await recv(ws)


async def member(relay: Relay, name: str, *channels: str):
    """A raw connection, identified and joined."""
    ident = Identity.generate(name)
    ws = await raw(relay)
    welcome = await identify(ws, ident)
    assert welcome["type"] == "WELCOME"
    for channel in channels:
        await send(ws, {"type": "JOIN", "channel": channel})
        assert (await recv(ws))["type"] == "JOINED"
    return ws, welcome["agent_id"]


@arun
async def test_full_handshake_and_join() -> None:
    relay = await started()
    ident = Identity.generate("swarm-qa-001")
    ws = await raw(relay)
    await send(ws, {"type": "IDENTIFY", "name": ident.name, "pubkey": ident.pubkey_pem})
    chal = await recv(ws)
    assert chal["type"] == "CHALLENGE"
    assert chal["challenge_id"].startswith("chal_")
    assert len(chal["nonce"]) == 32 and int(chal["nonce"], 16) >= 0
    now = int(time.time() * 1000)
    assert now < chal["expires_at"] <= now + 61_000
    stamp = int(time.time() * 1000)
    await send(ws, {"type": "VERIFY_IDENTITY", "challenge_id": chal["challenge_id"],
                    "signature": ident.sign_auth(chal["nonce"], chal["challenge_id"], stamp),
                    "timestamp": stamp})
    welcome = await recv(ws)
    assert welcome["type"] == "WELCOME"
    expected = "@" + hashlib.sha256(ident.pubkey_pem.encode()).hexdigest()[:16]
    assert welcome["agent_id"] == expected
    assert welcome["name"] == ident.name and welcome["lurk"] is False
    assert isinstance(welcome["ts"], int)
    await send(ws, {"type": "JOIN", "channel": "#agents"})
    joined = await recv(ws)
    assert joined["type"] == "JOINED" and joined["channel"] == "#agents"
    assert joined["agents"] == [{"id": expected, "name": ident.name, "verified": False}]
    assert relay.stats()["channels"] == {"#agents": 1}
    await send(ws, {"type": "IDENTIFY", "name": ident.name, "pubkey": ident.pubkey_pem})
    again = await recv(ws)
    assert (again["type"], again["code"]) == ("ERROR", "INVALID_MSG")
    await ws.close()
    await relay.stop()


@arun
async def test_bad_signature_is_refused_and_leaves_the_connection_unidentified() -> None:
    relay = await started()
    ident, thief = Identity.generate("victim"), Identity.generate("thief")
    ws = await raw(relay)
    await send(ws, {"type": "IDENTIFY", "name": "victim", "pubkey": ident.pubkey_pem})
    chal = await recv(ws)
    stamp = int(time.time() * 1000)
    forged = thief.sign_auth(chal["nonce"], chal["challenge_id"], stamp)
    await send(ws, {"type": "VERIFY_IDENTITY", "challenge_id": chal["challenge_id"],
                    "signature": forged, "timestamp": stamp})
    err = await recv(ws)
    assert (err["type"], err["code"]) == ("ERROR", "VERIFICATION_FAILED")
    await send(ws, {"type": "JOIN", "channel": "#agents"})
    assert (await recv(ws))["code"] == "AUTH_REQUIRED"
    # The challenge was discarded: a correct signature now comes too late.
    good = ident.sign_auth(chal["nonce"], chal["challenge_id"], stamp)
    await send(ws, {"type": "VERIFY_IDENTITY", "challenge_id": chal["challenge_id"],
                    "signature": good, "timestamp": stamp})
    assert (await recv(ws))["code"] == "VERIFICATION_EXPIRED"
    assert relay.stats()["identified"] == 0
    await ws.close()
    await relay.stop()


@arun
async def test_wrong_and_foreign_challenge_ids() -> None:
    relay = await started()
    a, b = Identity.generate("a"), Identity.generate("b")
    wa, wb = await raw(relay), await raw(relay)
    await send(wa, {"type": "IDENTIFY", "name": "a", "pubkey": a.pubkey_pem})
    chal_a = await recv(wa)
    await send(wa, {"type": "VERIFY_IDENTITY", "challenge_id": "chal_nope_00000000",
                    "signature": a.sign_auth(chal_a["nonce"], "chal_nope_00000000", 1),
                    "timestamp": 1})
    assert (await recv(wa))["code"] == "VERIFICATION_EXPIRED"
    await send(wb, {"type": "IDENTIFY", "name": "b", "pubkey": b.pubkey_pem})
    await recv(wb)
    await send(wb, {"type": "VERIFY_IDENTITY", "challenge_id": chal_a["challenge_id"],
                    "signature": b.sign_auth(chal_a["nonce"], chal_a["challenge_id"], 1),
                    "timestamp": 1})
    err = await recv(wb)
    assert (err["code"], err["message"]) == ("INVALID_MSG",
                                             "Challenge belongs to a different connection")
    # A's challenge survived both: A can still complete it.
    sig = a.sign_auth(chal_a["nonce"], chal_a["challenge_id"], 2)
    await send(wa, {"type": "VERIFY_IDENTITY", "challenge_id": chal_a["challenge_id"],
                    "signature": sig, "timestamp": 2})
    assert (await recv(wa))["type"] == "WELCOME"
    await wa.close()
    await wb.close()
    await relay.stop()


@arun
async def test_expired_challenge_errors_and_closes() -> None:
    relay = await started(challenge_ttl_s=0.2)
    ident = Identity.generate("slow")
    ws = await raw(relay)
    await send(ws, {"type": "IDENTIFY", "name": "slow", "pubkey": ident.pubkey_pem})
    assert (await recv(ws))["type"] == "CHALLENGE"
    err = await recv(ws, timeout=3)
    assert (err["type"], err["code"]) == ("ERROR", "VERIFICATION_EXPIRED")
    assert await closed_code(ws) == 1000
    await relay.stop()


@arun
async def test_unknown_type_missing_type_and_bad_fields() -> None:
    relay = await started()
    ws = await raw(relay)
    await send(ws, {"type": "SUMMON_DRAGON"})
    err = await recv(ws)
    assert (err["code"], err["message"]) == ("INVALID_MSG", "Unknown message type: SUMMON_DRAGON")
    await send(ws, {"channel": "#agents"})
    assert (await recv(ws))["message"] == "Missing message type"
    await send(ws, {"type": "IDENTIFY", "name": "no spaces allowed"})
    assert (await recv(ws))["message"] == "Invalid agent name"
    await send(ws, {"type": "IDENTIFY", "name": "ok", "pubkey": "not a pem"})
    assert "Invalid public key" in (await recv(ws))["message"]
    await send(ws, {"type": "JOIN", "channel": "#agents"})
    assert (await recv(ws))["code"] == "AUTH_REQUIRED"
    await send(ws, {"type": "PING"})
    assert (await recv(ws))["type"] == "PONG"  # still usable after every error
    assert relay.stats()["errors_sent"] == 5
    await ws.close()
    await relay.stop()


@arun
async def test_oversized_frame_closes_with_1009_and_max_size_passes() -> None:
    relay = await started()
    ws = await raw(relay)
    head = '{"type":"PING","pad":"'
    exact = head + "x" * (p.MAX_FRAME_BYTES - len(head) - 2) + '"}'
    assert len(exact.encode()) == p.MAX_FRAME_BYTES
    await ws.send(exact)
    assert (await recv(ws))["type"] == "PONG"
    await ws.send("x" * (p.MAX_FRAME_BYTES + 1))
    assert await closed_code(ws) == 1009
    await relay.stop()


@arun
async def test_non_json_and_invalid_utf8() -> None:
    relay = await started()
    ws = await raw(relay)
    await ws.send("this is not json")
    err = await recv(ws)
    assert (err["code"], err["message"]) == ("INVALID_MSG", "Invalid JSON")
    await ws.send("[1, 2, 3]")
    assert (await recv(ws))["code"] == "INVALID_MSG"
    await ws.send(b"\xff\xfe\x00garbage")  # binary frame, not UTF-8
    assert (await recv(ws))["code"] == "INVALID_MSG"
    await ws.send(b'{"type":"PING"}')  # binary frame holding valid JSON is accepted
    assert (await recv(ws))["type"] == "PONG"
    await send_text_bytes(ws, b"\xff\xfe")  # a text frame that is not UTF-8: protocol error
    assert await closed_code(ws) == 1007
    await relay.stop()


@arun
async def test_rate_limit_refuses_and_drops_the_second_msg() -> None:
    relay = await started(rate_limit=1.0)
    wa, id_a = await member(relay, "alice", "#agents")
    wb, _ = await member(relay, "bob", "#agents")
    await send(wa, {"type": "MSG", "to": "#agents", "content": "one"})
    got = await recv(wb)
    assert (got["type"], got["from"], got["content"]) == ("MSG", id_a, "one")
    assert got["from_name"] == "alice" and got["to"] == "#agents" and got["msg_id"]
    echo = await recv(wa)
    assert echo["content"] == "one"  # the sender gets its own MSG, as on the real server
    await send(wa, {"type": "MSG", "to": "#agents", "content": "two"})
    err = await recv(wa)
    assert (err["type"], err["code"]) == ("ERROR", "RATE_LIMITED")
    assert await nothing_within(wb, 0.3)
    await asyncio.sleep(1.0)
    await send(wa, {"type": "MSG", "to": "#agents", "content": "three"})
    assert (await recv(wb))["content"] == "three"  # "two" was dropped, never delivered
    assert relay.stats()["msgs_relayed"] == 2
    for ws in (wa, wb):
        await ws.close()
    await relay.stop()


@arun
async def test_msg_to_a_channel_not_joined() -> None:
    relay = await started(rate_limit=0)
    wa, _ = await member(relay, "alice", "#agents")
    wb, _ = await member(relay, "bob", "#other")
    await send(wa, {"type": "MSG", "to": "#other", "content": "sneak"})
    assert (await recv(wa))["code"] == "NOT_INVITED"
    await send(wa, {"type": "MSG", "to": "#nowhere", "content": "void"})
    assert (await recv(wa))["code"] == "CHANNEL_NOT_FOUND"
    assert await nothing_within(wb, 0.2)
    for ws in (wa, wb):
        await ws.close()
    await relay.stop()


@arun
async def test_direct_message_to_an_agent() -> None:
    relay = await started(rate_limit=0)
    wa, id_a = await member(relay, "alice")
    wb, id_b = await member(relay, "bob")
    await send(wa, {"type": "MSG", "to": id_b, "content": "psst"})
    got = await recv(wb)
    assert (got["from"], got["to"], got["content"]) == (id_a, id_b, "psst")
    assert (await recv(wa))["content"] == "psst"  # echoed to the sender
    await send(wa, {"type": "MSG", "to": "@0000000000000000", "content": "hello?"})
    assert (await recv(wa))["code"] == "AGENT_NOT_FOUND"
    for ws in (wa, wb):
        await ws.close()
    await relay.stop()


@arun
async def test_list_agents_ping_and_leave() -> None:
    relay = await started(rate_limit=0)
    wa, id_a = await member(relay, "alice", "#agents")
    wb, id_b = await member(relay, "bob", "#agents")
    await send(wa, {"type": "LIST_AGENTS", "channel": "#agents"})
    agents = await recv(wa)
    assert agents["type"] == "AGENTS" and agents["channel"] == "#agents"
    assert {a["id"] for a in agents["list"]} == {id_a, id_b}
    assert {a["name"] for a in agents["list"]} == {"alice", "bob"}
    await send(wa, {"type": "LIST_AGENTS", "channel": "#ghost"})
    assert (await recv(wa))["code"] == "CHANNEL_NOT_FOUND"
    await send(wa, {"type": "PING"})
    assert (await recv(wa))["type"] == "PONG"
    await send(wb, {"type": "LEAVE", "channel": "#agents"})
    assert await recv(wb) == {"type": "LEFT", "channel": "#agents", "ts": pytest.approx(
        int(time.time() * 1000), abs=5000)}
    await send(wb, {"type": "MSG", "to": "#agents", "content": "still here?"})
    assert (await recv(wb))["code"] == "NOT_INVITED"
    await send(wa, {"type": "LIST_AGENTS", "channel": "#agents"})
    assert [a["id"] for a in (await recv(wa))["list"]] == [id_a]
    await send(wa, {"type": "MSG", "to": "#agents", "content": "alone"})
    assert (await recv(wa))["content"] == "alone"
    assert await nothing_within(wb, 0.2)
    for ws in (wa, wb):
        await ws.close()
    await relay.stop()


@arun
async def test_same_identity_reconnecting_displaces_the_old_connection() -> None:
    relay = await started(rate_limit=0)
    ident = Identity.generate("twin")
    old = await raw(relay)
    assert (await identify(old, ident))["type"] == "WELCOME"
    await send(old, {"type": "JOIN", "channel": "#agents"})
    await recv(old)
    new = await raw(relay)
    assert (await identify(new, ident))["agent_id"] == ident.agent_id
    displaced = await recv(old)
    assert displaced["type"] == "SESSION_DISPLACED"
    assert await closed_code(old) == 1000
    assert relay.stats()["channels"]["#agents"] == 0
    assert relay.stats()["identified"] == 1
    await new.close()
    await relay.stop()


@arun
async def test_lurk_relay_reports_lurk_and_refuses_msgs() -> None:
    relay = await started(lurk=True, rate_limit=0)
    ident = Identity.generate("newbie")
    ws = await raw(relay)
    welcome = await identify(ws, ident)
    assert welcome["lurk"] is True
    assert welcome["lurk_until"] > int(time.time() * 1000)
    await send(ws, {"type": "JOIN", "channel": "#agents"})
    assert (await recv(ws))["type"] == "JOINED"
    await send(ws, {"type": "MSG", "to": "#agents", "content": "hi"})
    err = await recv(ws)
    assert (err["type"], err["code"]) == ("ERROR", "LURK_MODE")
    assert relay.stats()["msgs_relayed"] == 0
    await ws.close()
    await relay.stop()


def test_relay_main_runs_writes_port_file_and_stops_on_sigterm(tmp_path) -> None:
    port_file = tmp_path / "relay.port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentctl_swarm.agentchat.relay", "--host", "127.0.0.1",
         "--port", "0", "--rate-limit", "1", "--port-file", str(port_file)],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 10
        while not port_file.exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "relay never wrote its port file"
            time.sleep(0.02)
        port = int(port_file.read_text())

        async def ping() -> dict:
            async with connect(f"ws://127.0.0.1:{port}") as ws:
                await send(ws, {"type": "PING"})
                return await recv(ws)

        assert asyncio.run(ping())["type"] == "PONG"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert f"relay listening on ws://127.0.0.1:{port}" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def muting_member(relay: Relay, name: str, channel: str, mute: list[str]):
    ws, agent_id = await member(relay, name)
    await send(ws, {"type": "JOIN", "channel": channel, "mute": mute})
    joined = await recv(ws)
    assert joined["type"] == "JOINED", joined
    return ws, agent_id


@arun
async def test_mute_extension_spares_a_member_others_heartbeats_but_not_its_echo() -> None:
    relay = await started(rate_limit=0)
    ws = await raw(relay)
    assert (await identify(ws, Identity.generate("probe")))["features"] == ["mute"]
    await ws.close()
    observer, _ = await member(relay, "observer", "#agents")
    daemon, id_d = await muting_member(relay, "swarm-general-001", "#agents", ["HEARTBEAT"])
    other, id_o = await muting_member(relay, "swarm-general-002", "#agents", ["HEARTBEAT"])
    await send(other, {"type": "MSG", "to": "#agents", "content": "HEARTBEAT swarm-general-002 idle"})
    assert (await recv(other))["content"].startswith("HEARTBEAT")  # its echo: it paces the sender
    assert (await recv(observer))["from"] == id_o  # people and tools still see every beat
    assert await nothing_within(daemon, 0.3)
    # Only lines that start with the verb and a space are muted.
    for content in ("TASK t-1 any build it", "HEARTBEATS are not heartbeats", "HEARTBEAT"):
        await send(other, {"type": "MSG", "to": "#agents", "content": content})
        assert (await recv(daemon))["content"] == content
    # A later JOIN replaces the list: [] hears everything again.
    await send(daemon, {"type": "JOIN", "channel": "#agents", "mute": []})
    assert (await recv(daemon))["type"] == "JOINED"
    await send(other, {"type": "MSG", "to": "#agents", "content": "HEARTBEAT swarm-general-002 idle"})
    assert (await recv(daemon))["from"] == id_o
    for w in (observer, daemon, other):
        await w.close()
    await relay.stop()


@arun
async def test_mute_applies_to_the_replay_and_ends_with_membership() -> None:
    relay = await started(rate_limit=0)
    talker, _ = await member(relay, "talker", "#agents")
    for content in ("STATUS t-0 working", "TASK t-1 any first", "STATUS t-0 still"):
        await send(talker, {"type": "MSG", "to": "#agents", "content": content})
        await recv(talker)
    muted, _ = await muting_member(relay, "muted", "#agents", ["STATUS"])
    replayed = await recv(muted)
    assert (replayed["content"], replayed["replay"]) == ("TASK t-1 any first", True)
    assert await nothing_within(muted, 0.2)
    plain, _ = await member(relay, "plain", "#agents")
    assert [(await recv(plain))["content"] for _ in range(3)][::2] == ["STATUS t-0 working", "STATUS t-0 still"]
    # Leaving forgets the list: rejoining without one hears STATUS lines again.
    await send(muted, {"type": "LEAVE", "channel": "#agents"})
    assert (await recv(muted))["type"] == "LEFT"
    await send(muted, {"type": "JOIN", "channel": "#agents"})
    assert (await recv(muted))["type"] == "JOINED"
    assert [(await recv(muted))["content"] for _ in range(3)][0] == "STATUS t-0 working"
    assert relay._muted == {}
    for w in (talker, muted, plain):
        await w.close()
    await relay.stop()


@arun
async def test_bad_mute_lists_are_refused_and_a_relay_without_the_extension_ignores_them() -> None:
    relay = await started(rate_limit=0)
    ws, _ = await member(relay, "alice")
    for bad in ("HEARTBEAT", ["heartbeat"], ["HEART BEAT"], [1], ["A"] * 9):
        await send(ws, {"type": "JOIN", "channel": "#agents", "mute": bad})
        err = await recv(ws)
        assert (err["type"], err["code"]) == ("ERROR", "INVALID_MSG"), bad
    assert relay.stats()["channels"] == {}
    await ws.close()
    await relay.stop()
    plain = await started(rate_limit=0, mute=False)  # as a real server: no "features"
    ws = await raw(plain)
    assert "features" not in await identify(ws, Identity.generate("bob"))
    await send(ws, {"type": "JOIN", "channel": "#agents", "mute": ["HEARTBEAT"]})
    assert (await recv(ws))["type"] == "JOINED"
    assert plain._muted == {}
    await ws.close()
    await plain.stop()


@arun
async def test_heartbeats_are_not_kept_for_replay_so_a_task_outlives_a_round_of_them() -> None:
    relay = await started(rate_limit=0)
    poster, _ = await member(relay, "poster", "#agents")
    await send(poster, {"type": "MSG", "to": "#agents", "content": "TASK t-1 any do it"})
    await recv(poster)
    daemon, _ = await member(relay, "swarm-general-001", "#agents")
    assert (await recv(daemon))["content"] == "TASK t-1 any do it"  # its own replay
    for i in range(60):  # more lines than the history holds
        await send(daemon, {"type": "MSG", "to": "#agents", "content": f"HEARTBEAT swarm-general-001 idle {i}"})
    for i in range(60):
        assert (await recv(daemon))["content"].endswith(f" {i}")  # each reached the relay
    late, _ = await member(relay, "coordinator", "#agents")
    replayed = await recv(late)
    assert (replayed["content"], replayed["replay"]) == ("TASK t-1 any do it", True)
    assert await nothing_within(late, 0.2)
    for ws in (poster, late, daemon):
        await ws.close()
    await relay.stop()
