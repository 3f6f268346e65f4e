"""The soak's own agentchat peers: an observer, a well-behaved task poster, a flooder.

All three run in one background thread with its own asyncio loop (``PeerLoop``),
so the soak's main thread (faults) and sampler thread never block on the relay.

* ``Observer`` joins the work channel with the project's client and records who
  sends ``HEARTBEAT`` (by name, from senders that are not the soak's own peers)
  and every verdict line (DONE/FAIL/BLOCKED). Its reconnect backoff is short, so
  after a relay outage it is back before the daemons (whose backoff starts at 1 s).
* ``post_channel_task`` sends a valid ``TASK`` line from a separate identity:
  tasks posted on the channel are a documented input of the coordinator.
* ``flood`` is a misbehaving peer on raw WebSocket frames (no pacing, no
  validation): malformed JSON, unknown types, malformed verbs, spoofed
  ASSIGN/REJECTED/CLAIM/DONE/HEARTBEAT, 10 000-character lines and a frame
  over the 2 MiB limit; a second connection identifies and then stops reading.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from typing import Any

from tests import rawws
from agentctl_swarm.agentchat.client import AgentChatClient
from agentctl_swarm.agentchat.identity import Identity

CHANNEL = "#agents"
VERDICTS = ("DONE", "FAIL", "BLOCKED")


class PeerLoop:
    """One asyncio loop in a daemon thread; ``run(coro)`` from any thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="soak-peers", daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float | None = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Observer:
    """Counts HEARTBEAT senders and verdict lines as the relay delivers them."""

    def __init__(self, peers: PeerLoop) -> None:
        self.peers = peers
        self.identity = Identity.generate("soak-observer")
        self.ignore: set[str] = set()  # agent ids of the soak's own peers
        self.client: AgentChatClient | None = None
        self.url = ""
        self.last_hb: dict[str, float] = {}
        self.hb_count: dict[str, int] = {}
        self.verdicts: list[tuple[float, str, str, str]] = []  # (time, verb, task, agent)
        self.connected_since: float | None = None
        self.task_lines: set[str] = set()  # ids of TASK lines the relay delivered (any sender)
        # STATUS and verdict lines in the order the relay delivered them: (verb, task, agent, text)
        self.task_stream: list[tuple[str, str, str, str]] = []

    @property
    def connected(self) -> bool:
        return self.client is not None and self.client.connected

    def set_url(self, url: str) -> None:
        """(Re)connect to ``url`` (the embedded relay's port changes with each supervisor)."""
        if url == self.url and self.client is not None:
            return
        self.peers.run(self._switch(url))

    async def _switch(self, url: str) -> None:
        if self.client is not None:
            await self.client.close()
        self.url, self.connected_since = url, None
        self.client = AgentChatClient(url, self.identity, [CHANNEL], on_message=self._on_msg,
                                      on_event=self._on_event, send_interval=0.05,
                                      backoff=lambda attempt: 0.3, keepalive=5.0)
        asyncio.get_running_loop().create_task(self.client.run())

    def _on_event(self, event: str, detail: dict[str, Any]) -> None:
        if event == "connected":
            self.connected_since = time.time()
            self.task_stream.append(("GAP", "", "", ""))  # lines may have passed unseen
        elif event in ("disconnected", "lost"):
            self.connected_since = None

    def _on_msg(self, frame: dict[str, Any]) -> None:
        content, sender = frame.get("content"), str(frame.get("from", ""))
        if isinstance(content, str) and content.startswith("TASK "):
            self.task_lines.add(content.split(" ", 2)[1] if content.count(" ") >= 1 else "")
        if not isinstance(content, str) or sender in self.ignore or frame.get("to") != CHANNEL:
            return
        words = content.split(" ", 3)
        now = time.time()
        if words[0] == "HEARTBEAT" and len(words) >= 3:
            self.last_hb[words[1]] = now
            self.hb_count[words[1]] = self.hb_count.get(words[1], 0) + 1
        elif words[0] in VERDICTS and len(words) >= 3:
            self.verdicts.append((now, words[0], words[1], words[2]))
            self.task_stream.append((words[0], words[1], words[2], ""))
        elif words[0] == "STATUS" and len(words) >= 3:
            self.task_stream.append(("STATUS", words[1], words[2], words[3] if len(words) > 3 else ""))

    def senders_since(self, since: float) -> set[str]:
        return {name for name, t in self.last_hb.items() if t >= since}

    def close(self) -> None:
        if self.client is not None:
            try:
                self.peers.run(self.client.close(), timeout=10)
            except Exception:  # noqa: BLE001 - closing at the end of the soak
                pass


class Poster:
    """A well-behaved peer that posts TASK lines on the channel."""

    def __init__(self, peers: PeerLoop) -> None:
        self.peers = peers
        self.identity = Identity.generate("soak-poster")
        self.client: AgentChatClient | None = None
        self.url = ""

    def set_url(self, url: str) -> None:
        if url == self.url and self.client is not None:
            return
        self.peers.run(self._switch(url))

    async def _switch(self, url: str) -> None:
        if self.client is not None:
            await self.client.close()
        self.url = url
        self.client = AgentChatClient(url, self.identity, [CHANNEL], on_message=lambda f: None,
                                      send_interval=0.05, backoff=lambda attempt: 0.5)
        asyncio.get_running_loop().create_task(self.client.run())

    def post(self, task_id: str, prompt: str) -> bool:
        """Queue ``TASK <id> any <prompt>``; False if not connected (then not posted)."""
        if self.client is None or not self.client.connected:
            return False
        line = f"TASK {task_id} any {prompt}"
        self.peers.loop.call_soon_threadsafe(self.client.send, CHANNEL, line)
        return True

    def close(self) -> None:
        if self.client is not None:
            try:
                self.peers.run(self.client.close(), timeout=10)
            except Exception:  # noqa: BLE001
                pass


async def _raw_join(url: str, identity: Identity) -> Any:
    """Connect and identify with raw frames; returns the open connection."""
    ws = await rawws.connect(url, max_size=None, compression=None)
    await ws.send(json.dumps({"type": "IDENTIFY", "name": identity.name, "pubkey": identity.pubkey_pem}))
    while True:
        msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if msg.get("type") == "CHALLENGE":
            ts = int(time.time() * 1000)
            sig = identity.sign_auth(msg["nonce"], msg["challenge_id"], ts)
            await ws.send(json.dumps({"type": "VERIFY_IDENTITY", "challenge_id": msg["challenge_id"],
                                      "signature": sig, "timestamp": ts}))
        elif msg.get("type") == "WELCOME":
            break
        elif msg.get("type") == "ERROR":
            raise ConnectionError(f"handshake refused: {msg}")
    await ws.send(json.dumps({"type": "JOIN", "channel": CHANNEL}))
    return ws


def hostile_lines(rng: random.Random, agents: list[str], tasks: list[str]) -> list[str]:
    """Channel contents a misbehaving peer sends: bad grammar and spoofed verbs."""
    agent = rng.choice(agents) if agents else "swarm-general-001"
    task = rng.choice(tasks) if tasks else "soak-0001"
    return [
        f"ASSIGN {task} {agent}", f"REJECTED {task} {agent}", f"CLAIM {task} {agent}",
        f"UNCLAIM {task} {agent}", f"DONE {task} {agent} spoofed by the flooder",
        f"FAIL {task} {agent} spoofed", f"HEARTBEAT {agent} idle", f"HEARTBEAT ghost-agent-999 idle",
        "TASK ../../etc/passwd any rm -rf /", "TASK ok-id notarole do it", "TASK", "CLAIM",
        f"ASSIGN {task}", "ASSIGN $(reboot) swarm-general-001", f"STATUS {task} {agent} " + "x" * 9000,
        "DONE " + "y" * 10000, "\x00\x01\x02 binary-ish", "HEARTBEAT " + "z" * 5000,
        "NOT-A-VERB at all",
    ]


async def flood(url: str, seconds: float, rng: random.Random, agents: list[str], tasks: list[str],
                ignore: set[str]) -> dict[str, int]:
    """Misbehave on the channel for ``seconds``; returns counters (frames sent, reconnects)."""
    identity = Identity.generate("soak-flooder")
    slow_identity = Identity.generate("soak-slowpeer")
    ignore.update({identity.agent_id, slow_identity.agent_id})
    stats = {"frames": 0, "reconnects": 0, "oversized": 0}
    slow = None
    try:
        slow = await _raw_join(url, slow_identity)  # then never read: a stalled consumer
    except (OSError, ConnectionError, asyncio.TimeoutError, rawws.ConnectionClosed):
        pass
    deadline = time.monotonic() + seconds
    ws = None
    while time.monotonic() < deadline:
        try:
            if ws is None:
                ws = await _raw_join(url, identity)
                stats["reconnects"] += 1
            await _flood_burst(ws, rng, agents, tasks, stats)
            await asyncio.sleep(0.05)
        except (OSError, ConnectionError, asyncio.TimeoutError, rawws.ConnectionClosed):
            ws = None
            await asyncio.sleep(0.2)
    for conn in (ws, slow):
        if conn is not None:
            try:
                await asyncio.wait_for(conn.close(), 3)
            except Exception:  # noqa: BLE001 - the relay may already have dropped it
                pass
    return stats


async def _flood_burst(ws: Any, rng: random.Random, agents: list[str], tasks: list[str],
                       stats: dict[str, int]) -> None:
    frames: list[str] = ["{not json", json.dumps({"type": "NOPE"}), json.dumps({"type": "MSG"}),
                         json.dumps({"type": "MSG", "to": "#nowhere", "content": "x"}),
                         json.dumps({"type": "JOIN", "channel": "bad channel"}), "[]", "null"]
    for line in hostile_lines(rng, agents, tasks):
        frames.append(json.dumps({"type": "MSG", "to": CHANNEL, "content": line}))
    rng.shuffle(frames)
    for frame in frames:
        await ws.send(frame)
        stats["frames"] += 1
    if rng.random() < 0.1:
        stats["oversized"] += 1
        await ws.send(json.dumps({"type": "MSG", "to": CHANNEL, "content": "o" * (2 * 1024 * 1024 + 10)}))
