"""Which incoming frames the agentchat client parses, and which it drops unparsed.

The frames are built with the relay's own encoder, so the layout tested is the
one the swarm sees on the wire.
"""

from __future__ import annotations

import asyncio
import json

from agentctl_swarm.agentchat import protocol as p
from agentctl_swarm.agentchat.client import AgentChatClient
from agentctl_swarm.agentchat.identity import Identity

ME, PEER = "a" * 16, "b" * 16


def _msg(sender: str, content: str, to: str = "#agents") -> str:
    return p.encode({"type": p.MSG, "ts": 1, "from": sender, "from_name": "x", "to": to,
                     "content": content, "msg_id": "1-1", "verified": False})


def _client(ignore_heartbeats: bool) -> tuple[AgentChatClient, list[dict]]:
    got: list[dict] = []
    client = AgentChatClient("ws://127.0.0.1:1", Identity.generate("t"), ["#agents"],
                             on_message=got.append, ignore_heartbeats=ignore_heartbeats)
    client._agent_id, client._own_from = ME, f'"from":{json.dumps(ME)}'
    return client, got


def test_presence_notices_are_dropped_and_messages_delivered() -> None:
    client, got = _client(ignore_heartbeats=False)
    joined = p.encode({"type": p.AGENT_JOINED, "ts": 1, "channel": "#agents",
                       "agent": {"id": PEER, "name": "x", "verified": False}})
    assert client._skippable(joined)
    for frame in (joined, _msg(PEER, "HEARTBEAT swarm-general-002 idle"), _msg(PEER, "TASK t-1 any do it")):
        client._on_frame(frame)
    assert [m["content"] for m in got] == ["HEARTBEAT swarm-general-002 idle", "TASK t-1 any do it"]


def test_ignore_heartbeats_drops_only_others_heartbeats() -> None:
    asyncio.run(_ignore_heartbeats())


async def _ignore_heartbeats() -> None:
    client, got = _client(ignore_heartbeats=True)
    client._inflight = ("#agents", "HEARTBEAT swarm-general-001 idle")
    client._on_frame(_msg(PEER, "HEARTBEAT swarm-general-002 idle"))
    assert got == []
    # Our own heartbeat's echo is still parsed: it settles the MSG in flight.
    client._on_frame(_msg(ME, "HEARTBEAT swarm-general-001 idle"))
    assert client._inflight is None
    # A message that merely quotes the patterns, and an error frame, get through.
    sneaky = _msg(PEER, 'TASK t-2 any say "content":"HEARTBEAT x" and "type":"AGENT_JOINED"')
    client._on_frame(sneaky)
    assert [m["content"] for m in got] == [json.loads(sneaky)["content"]]
    assert not client._skippable(p.encode({"type": p.ERROR, "code": "X", "message": "m"}))


def test_frames_laid_out_otherwise_are_parsed() -> None:
    client, got = _client(ignore_heartbeats=True)
    spaced = json.dumps({"type": p.MSG, "from": PEER, "to": "#agents",
                         "content": "HEARTBEAT swarm-general-002 idle"})  # ", " and ": "
    assert not client._skippable(spaced)
    client._on_frame(spaced)
    reordered = json.dumps({"content": "TASK t-3 any x", "type": p.MSG, "from": PEER, "to": "#agents"},
                           separators=(",", ":"))
    assert not client._skippable(reordered)
    client._on_frame(reordered)
    assert [m["content"] for m in got] == ["HEARTBEAT swarm-general-002 idle", "TASK t-3 any x"]


def _joined(channel: str, members: list[dict]) -> str:
    """A JOINED frame as the relay writes it (relay.Relay._on_join: spliced member fragments)."""
    frags = ",".join(p.encode(m) for m in members)
    return f'{{"type":"{p.JOINED}","ts":1,"channel":{json.dumps(channel)},"agents":[{frags}]}}'


def test_a_joined_frame_is_read_without_parsing_its_member_list() -> None:
    from agentctl_swarm.agentchat.client import _joined_channel

    members = [{"id": f"{i:016x}", "name": f"swarm-general-{i:03d}", "verified": False}
               for i in range(500)]
    sneaky = {"id": PEER, "name": 'x","channel":"#evil', "verified": False}  # escaped in JSON
    assert _joined_channel(_joined("#agents", members)) == "#agents"
    assert _joined_channel(_joined("#agents", [sneaky, *members])) == "#agents"
    assert _joined_channel(_joined('#a"b', [])) == '#a"b'
    assert json.loads(_joined("#agents", members))["channel"] == "#agents"  # the layout is valid JSON
    # Anything else is left to the full parse.
    members_first = json.dumps({"type": p.JOINED, "agents": [{"channel": "#evil"}], "channel": "#agents"},
                               separators=(",", ":"))
    assert _joined_channel(members_first) is None
    assert _joined_channel(json.dumps({"type": p.JOINED, "channel": "#agents"})) is None  # ", " and ": "
    assert _joined_channel(_joined("#agents", []).encode()) is None
    assert _joined_channel(p.encode({"type": p.ERROR, "channel": "#agents"})) is None
    assert _joined_channel('{"type":"JOINED","ts":1,"channel":"#agen') is None
