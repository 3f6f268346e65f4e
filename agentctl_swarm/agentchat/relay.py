"""The embedded agentchat relay: the real server's core subset, on loopback.

Design note.  The relay answers the frames described in ``protocol.py`` the way
the real server does (same types, fields, error codes and order of checks), so a
daemon that works here works against ``@tjamescouch/agentchat``.  Deliberate
differences, all to keep a 1000-daemon swarm cheap:

* a valid channel is created by the first JOIN (the real server has a fixed
  preset list and says CHANNEL_NOT_FOUND for others);
* a replay of the last HISTORY channel MSGs to each joiner (``replay: true``),
  HEARTBEAT lines not counted (with more than HISTORY daemons one round of beats
  would push every TASK out of it before a returning coordinator could see it),
  kept in ``history_file`` when one is given, so it outlives the relay process
  (the supervisor's relay dies with it; its successor replays what was said);
  no ``@server`` welcome MSG, and AGENT_JOINED/AGENT_LEFT only with
  ``announce_presence=True`` (N joins would otherwise cost O(N²) frames);
* the ``mute`` extension (see ``protocol``): WELCOME offers it, and a member that
  JOINs with ``mute: ["HEARTBEAT"]`` (every daemon does) is not sent the others'
  heartbeats. A swarm of N daemons each heartbeating to the channel would
  otherwise cost N² deliveries per beat, which the daemons only drop: at N = 500
  that was ~1.5 s of a 5 s start, and most of an idle 1000-daemon swarm's CPU;
* ``lurk=True`` makes *every* identity lurk for ``lurk_s`` (the real server
  lurks identities first seen less than an hour ago).

Performance: connections are plain asyncio protocols (``_ws``): each received
frame is dispatched synchronously from ``data_received``, with no task per
connection or per message.  A channel MSG is encoded as one WebSocket frame and
the same bytes are written to N transports (no await; a peer more than
``_ws.MAX_WRITE_BUFFER`` behind is cut off).  Fan-out is batched per member and,
while MSGs keep coming, flushed at most every ``CORK_S``; replies a peer waits
for (CHALLENGE, WELCOME, JOINED, ERROR, PONG) leave at the end of the loop turn.
The JOINED member list is spliced from per-member JSON fragments made once at WELCOME.  Challenge
expiry uses one ``call_later`` timer per pending challenge, no polling.
Compression is off (permessage-deflate costs ~100s of KB per connection) and
server keepalive pings are off by default: on loopback a dead peer's socket is
closed by its kernel.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import collections.abc
import contextlib
import base64
import binascii
import itertools
import json
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agentctl_swarm.agentchat import _ws
from agentctl_swarm.agentchat import protocol as p
from agentctl_swarm.agentchat.identity import agent_id_for
from agentctl_swarm.errors import StateError
from agentctl_swarm.state import write_bytes_atomic

log = logging.getLogger(__name__)
HISTORY = 50  # channel MSGs replayed to a joiner
UNREPLAYED = frozenset({"HEARTBEAT"})  # verbs never kept for replay: stale at once, and many
CORK_S = 0.02  # under a stream of MSGs, fan-out writes leave at most every 20 ms

LURK_REASON = "New identities must wait 1 hour before sending messages."


def _now_ms() -> int:
    return int(time.time() * 1000)


class _Challenge:
    __slots__ = ("cid", "nonce", "expires_ms", "name", "pubkey", "key", "timer")

    def __init__(self, cid: str, nonce: str, expires_ms: int, name: str, pubkey: str,
                 key: Ed25519PublicKey, timer: asyncio.TimerHandle) -> None:
        self.cid, self.nonce, self.expires_ms = cid, nonce, expires_ms
        self.name, self.pubkey, self.key, self.timer = name, pubkey, key, timer


class _Conn:
    """Per-connection state; ``agent_id`` is set once WELCOME has been sent."""

    __slots__ = ("ws", "agent_id", "name", "channels", "last_msg", "challenge", "lurk",
                 "lurk_until", "member_frag")

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.agent_id: str | None = None
        self.name = ""
        self.channels: set[str] = set()
        self.last_msg = float("-inf")
        self.challenge: _Challenge | None = None
        self.lurk = False
        self.lurk_until = 0
        self.member_frag = ""


class ChannelHistory:
    """The last ``size`` MSGs of each channel, as replay frames, optionally kept in a file.

    The file is a JSON-lines log: a line is appended (one ``write``, ``O_APPEND``)
    *before* the MSG is fanned out, so whatever a member saw survives the relay being
    killed (the page cache outlives the process; a power cut is not covered: no fsync).
    Loading keeps the last ``size`` per channel and skips a torn or foreign line; the
    log is rewritten (``write_bytes_atomic``) when it holds four times what is kept.  A
    write that fails (a full disk) is logged once and retried as a rewrite at most
    once a second; the in-memory history, and the relay, carry on regardless.
    """

    def __init__(self, path: Path | None = None, size: int = HISTORY) -> None:
        self.path, self.size = path, size
        self._texts: dict[str, collections.deque[str]] = {}
        self._frames: dict[str, collections.deque[tuple[str, bytes]]] = {}  # (verb, frame)
        self._fd: int | None = None
        self._lines = 0
        self._failed_at: float | None = None
        if path is not None:
            self._load(path)
            self._rewrite()

    def frames(self, channel: str, mute: collections.abc.Container[str] = ()) -> list[bytes]:
        """The replay frames of ``channel``, but those whose line starts with a ``mute`` verb."""
        return [frame for verb, frame in self._frames.get(channel, ()) if verb not in mute]

    def add(self, channel: str, text: str, verb: str = "") -> None:
        """Keep ``text`` (a MSG frame's JSON, replay flag included) for ``channel``;
        ``verb`` is the first word of its content (``protocol.first_word``)."""
        self._keep(channel, text, verb)
        if self.path is None:
            return
        self._lines += 1
        if self._failed_at is not None or self._lines > 4 * self.size * max(1, len(self._texts)):
            if self._failed_at is None or time.monotonic() - self._failed_at >= 1.0:
                self._rewrite()
            return
        try:
            os.write(self._fd, (text + "\n").encode())  # type: ignore[arg-type]
        except OSError as exc:
            self._failed(exc)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _keep(self, channel: str, text: str, verb: str) -> None:
        if channel not in self._texts:
            self._texts[channel] = collections.deque(maxlen=self.size)
            self._frames[channel] = collections.deque(maxlen=self.size)
        self._texts[channel].append(text)
        self._frames[channel].append((verb, _ws.text_frame(text)))

    def _load(self, path: Path) -> None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("channel history %s not read: %s", path, exc)
            return
        for raw in data.splitlines():
            try:
                frame = json.loads(raw)
                channel = frame["to"]
            except (ValueError, TypeError, KeyError):
                continue  # a line torn by a full disk or a kill mid-write
            content = frame.get("content")
            if (isinstance(channel, str) and channel.startswith("#") and frame.get("type") == p.MSG
                    and isinstance(content, str)):
                self._keep(channel, raw.decode(), p.first_word(content))

    def _rewrite(self) -> None:
        assert self.path is not None
        self.close()
        body = "".join(t + "\n" for texts in self._texts.values() for t in texts).encode()
        try:
            write_bytes_atomic(self.path, body, durable=False)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except (StateError, OSError) as exc:
            self._failed(exc)
            return
        self._lines = sum(len(t) for t in self._texts.values())
        if self._failed_at is not None:
            log.info("channel history %s written again", self.path)
        self._failed_at = None

    def _failed(self, exc: Exception) -> None:
        if self._failed_at is None:
            log.warning("channel history %s not written (%s); kept in memory, retrying", self.path, exc)
        self._failed_at = time.monotonic()


class Relay:
    """A loopback agentchat relay; ``await start()`` returns the bound port."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, rate_limit: float = 1.0,
                 challenge_ttl_s: float = 60.0, lurk: bool = False, lurk_s: float = 3600.0,
                 announce_presence: bool = False, ping_interval: float | None = None,
                 server_name: str = "agentctl-relay", history_file: Path | None = None,
                 mute: bool = True, cork: float = CORK_S) -> None:
        self.host, self.port = host, port
        self._cork = cork
        self._interval = 1.0 / rate_limit if rate_limit > 0 else 0.0
        self._ttl = challenge_ttl_s
        self._lurk, self._lurk_ms = lurk, int(lurk_s * 1000)
        self._presence = announce_presence
        self._ping_interval = ping_interval
        self._server_name = server_name
        self._server: Any = None
        self._conns: set[_Conn] = set()
        self._by_id: dict[str, _Conn] = {}
        self._challenges: dict[str, _Conn] = {}
        self._channels: dict[str, dict[Any, _Conn]] = {}
        # channel -> verb -> the members that muted it (the "mute" extension)
        self._muted: dict[str, dict[str, set[Any]]] = {}
        self._features = [p.FEATURE_MUTE] if mute else []
        # The last channel MSGs, replayed to a joiner flagged "replay": true as the real
        # server does, so a line sent just before someone (re)joins is not lost to them.
        self._history = ChannelHistory(history_file)
        self._msg_ids = itertools.count(1)
        self._counts = {"handshakes": 0, "msgs_relayed": 0, "frames_fanned_out": 0,
                        "errors_sent": 0}
        self._handlers: dict[str, Callable[[_Conn, dict], None]] = {
            p.IDENTIFY: self._on_identify, p.VERIFY_IDENTITY: self._on_verify,
            p.JOIN: self._on_join, p.LEAVE: self._on_leave, p.MSG: self._on_msg,
            p.PING: self._on_ping, p.LIST_AGENTS: self._on_list_agents,
            p.LIST_CHANNELS: self._on_list_channels,
        }

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> int:
        """Bind and start accepting; returns the bound port."""
        self._server = await _ws.serve(self._on_open, self.host, self.port,
                                       max_size=p.MAX_FRAME_BYTES, backlog=4096, cork=self._cork)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        """Close the listener and every connection (close code 1001)."""
        if self._server is None:
            return
        self._server.close()
        self._server = None
        conns = list(self._conns)
        for conn in conns:
            conn.ws.close(1001, "relay stopping")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_ws.CLOSE_TIMEOUT + 1):
                await asyncio.gather(*(conn.ws.wait_closed() for conn in conns))
        self._history.close()

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def stats(self) -> dict[str, Any]:
        """Counters for status and benchmarks."""
        channels = {name: len(members) for name, members in self._channels.items()}
        return {"connections": len(self._conns), "identified": len(self._by_id),
                "channels": channels, **self._counts}

    # -- connection loop ---------------------------------------------------------------

    def _on_open(self, ws: _ws.WebSocket) -> None:
        conn = _Conn(ws)
        self._conns.add(conn)
        ws.on_text = lambda raw: self._dispatch(conn, raw)
        ws.on_close = lambda _ws: self._on_close(conn)
        if self._ping_interval:
            ws.keepalive(self._ping_interval)

    def _on_close(self, conn: _Conn) -> None:
        self._detach(conn)
        self._conns.discard(conn)

    def _dispatch(self, conn: _Conn, raw: str | bytes) -> None:
        try:
            msg = p.decode(raw)
        except p.ProtocolError as exc:
            self._error(conn, p.INVALID_MSG, str(exc))
            return
        problem = p.validate_client(msg)
        if problem is not None:
            self._error(conn, p.INVALID_MSG, problem)
            return
        try:
            self._handlers[msg["type"]](conn, msg)
        except Exception:  # a relay bug must not drop the connection silently
            log.exception("relay: error handling %s", msg.get("type"))
            self._error(conn, p.INVALID_MSG, "Internal error")

    def _detach(self, conn: _Conn) -> None:
        """Forget a connection's challenge, identity and memberships (idempotent)."""
        if conn.challenge is not None:
            conn.challenge.timer.cancel()
            self._challenges.pop(conn.challenge.cid, None)
            conn.challenge = None
        if conn.agent_id is not None and self._by_id.get(conn.agent_id) is conn:
            del self._by_id[conn.agent_id]
        for name in conn.channels:
            members = self._channels.get(name)
            if members is not None:
                members.pop(conn.ws, None)
                self._set_mute(name, conn.ws, ())
                self._announce(p.AGENT_LEFT, name, conn)
        conn.channels = set()

    # -- sending -----------------------------------------------------------------------

    def _send(self, conn: _Conn, msg: dict[str, Any]) -> None:
        msg["ts"] = _now_ms()
        conn.ws.send_frame(_ws.text_frame(p.encode(msg)), urgent=True)

    def _error(self, conn: _Conn, code: str, message: str) -> None:
        self._counts["errors_sent"] += 1
        self._send(conn, {"type": p.ERROR, "code": code, "message": message})

    def _close_later(self, conn: _Conn, code: int, reason: str) -> None:
        """Close after the frames already written (the close frame follows them)."""
        conn.ws.close(code, reason)

    def _announce(self, mtype: str, channel: str, conn: _Conn) -> None:
        if not self._presence or not self._channels.get(channel):
            return
        frame = _ws.text_frame(p.encode({"type": mtype, "ts": _now_ms(), "channel": channel,
                                         "agent": conn.agent_id, "name": conn.name}))
        for ws in self._channels[channel]:
            if ws is not conn.ws:
                ws.send_frame(frame)

    # -- handshake ---------------------------------------------------------------------

    def _on_identify(self, conn: _Conn, msg: dict) -> None:
        if conn.agent_id is not None:
            return self._error(conn, p.INVALID_MSG, "Already identified")
        if conn.challenge is not None:
            return self._error(conn, p.INVALID_MSG, "Challenge already pending")
        pubkey = msg.get("pubkey")
        if pubkey is None:
            return self._welcome_ephemeral(conn, msg["name"])
        key = _parse_pubkey(pubkey)
        if key is None:
            return self._error(conn, p.INVALID_MSG,
                               "Invalid public key format (must be Ed25519 PEM)")
        cid = f"chal_{_base36(_now_ms())}_{secrets.token_hex(4)}"
        expires = _now_ms() + int(self._ttl * 1000)
        timer = asyncio.get_running_loop().call_later(self._ttl, self._expire, conn, cid)
        conn.challenge = _Challenge(cid, secrets.token_hex(16), expires, msg["name"], pubkey,
                                    key, timer)
        self._challenges[cid] = conn
        self._send(conn, {"type": p.CHALLENGE, "challenge_id": cid,
                          "nonce": conn.challenge.nonce, "expires_at": expires})

    def _expire(self, conn: _Conn, cid: str) -> None:
        """Challenge TTL elapsed: ERROR and close, as the real server does."""
        if conn.challenge is None or conn.challenge.cid != cid:
            return
        self._challenges.pop(cid, None)
        conn.challenge = None
        self._error(conn, p.VERIFICATION_EXPIRED, "Challenge expired")
        self._close_later(conn, p.CLOSE_NORMAL, "Challenge expired")

    def _on_verify(self, conn: _Conn, msg: dict) -> None:
        if conn.agent_id is not None:
            return self._error(conn, p.INVALID_MSG, "Already identified")
        cid = msg["challenge_id"]
        owner = self._challenges.get(cid)
        if owner is None:
            return self._error(conn, p.VERIFICATION_EXPIRED, "Challenge not found or expired")
        if owner is not conn:
            return self._error(conn, p.INVALID_MSG,
                               "Challenge belongs to a different connection")
        chal = conn.challenge
        assert chal is not None
        chal.timer.cancel()
        del self._challenges[cid]
        conn.challenge = None
        if _now_ms() > chal.expires_ms:
            return self._error(conn, p.VERIFICATION_EXPIRED, "Challenge expired")
        if not _verify(chal, msg["signature"], msg["timestamp"]):
            return self._error(conn, p.VERIFICATION_FAILED, "Invalid signature")
        self._welcome(conn, chal.name, agent_id_for(chal.pubkey))

    def _welcome(self, conn: _Conn, name: str, agent_id: str) -> None:
        old = self._by_id.get(agent_id)
        if old is not None and old is not conn:
            self._displace(old)
        self._register(conn, name, agent_id, lurk=self._lurk)
        welcome: dict[str, Any] = {"type": p.WELCOME, "agent_id": agent_id, "name": name,
                                   "server": self._server_name, "verified": False,
                                   "lurk": conn.lurk}
        if self._features:
            welcome["features"] = self._features
        if conn.lurk:
            welcome.update(lurk_until=conn.lurk_until, lurk_reason=LURK_REASON)
        self._send(conn, welcome)

    def _welcome_ephemeral(self, conn: _Conn, name: str) -> None:
        """No pubkey: a listen-only agent with a random id, as on the real server."""
        agent_id = "@" + secrets.token_hex(4)
        self._register(conn, name, agent_id, lurk=True)
        conn.lurk_until = 0
        self._send(conn, {"type": p.WELCOME, "agent_id": agent_id, "name": name,
                          "server": self._server_name, "lurk": True,
                          "lurk_reason": "Persistent identity required to send messages."})

    def _register(self, conn: _Conn, name: str, agent_id: str, *, lurk: bool) -> None:
        conn.agent_id, conn.name, conn.lurk = agent_id, name, lurk
        conn.lurk_until = _now_ms() + self._lurk_ms if lurk else 0
        conn.member_frag = p.encode({"id": agent_id, "name": name, "verified": False})
        self._by_id[agent_id] = conn
        self._counts["handshakes"] += 1

    def _displace(self, old: _Conn) -> None:
        """The newer verified connection wins; the old one is told and closed."""
        log.info("relay: %s reconnected; displacing the older connection", old.agent_id)
        self._send(old, {"type": p.SESSION_DISPLACED,
                         "reason": "Another connection verified this identity",
                         "new_ip": "127.0.0.1"})
        self._detach(old)
        old.agent_id = None
        self._close_later(old, p.CLOSE_NORMAL, "Identity claimed by verified connection")

    # -- channels and messages ---------------------------------------------------------

    def _identified(self, conn: _Conn) -> bool:
        if conn.agent_id is None:
            self._error(conn, p.AUTH_REQUIRED, "Must IDENTIFY first")
            return False
        return True

    def _on_join(self, conn: _Conn, msg: dict) -> None:
        if not self._identified(conn):
            return
        name = msg["channel"]
        members = self._channels.setdefault(name, {})
        if conn.ws not in members:
            members[conn.ws] = conn
            conn.channels.add(name)
            self._announce(p.AGENT_JOINED, name, conn)
        if "mute" in msg and self._features:
            self._set_mute(name, conn.ws, msg["mute"])
        frags = ",".join(m.member_frag for m in members.values())
        text = (f'{{"type":"{p.JOINED}","ts":{_now_ms()},"channel":{json.dumps(name)},'
                f'"agents":[{frags}]}}')
        mute = [verb for verb, who in self._muted.get(name, {}).items() if conn.ws in who]
        for frame in (_ws.text_frame(text), *self._history.frames(name, mute)):
            conn.ws.send_frame(frame, urgent=True)

    def _set_mute(self, channel: str, ws: Any, verbs: collections.abc.Iterable[str]) -> None:
        """Make ``verbs`` the lines ``ws`` is not sent on ``channel``."""
        muted = self._muted.setdefault(channel, {})
        wanted = set(verbs)
        for verb in wanted | muted.keys():
            who = muted.setdefault(verb, set())
            (who.add if verb in wanted else who.discard)(ws)
            if not who:
                del muted[verb]
        if not muted:
            del self._muted[channel]

    def _on_leave(self, conn: _Conn, msg: dict) -> None:
        if not self._identified(conn):
            return
        name = msg["channel"]
        members = self._channels.get(name)
        if members is None:
            return
        if members.pop(conn.ws, None) is not None:
            conn.channels.discard(name)
            self._set_mute(name, conn.ws, ())
            self._announce(p.AGENT_LEFT, name, conn)
        self._send(conn, {"type": p.LEFT, "channel": name})

    def _on_msg(self, conn: _Conn, msg: dict) -> None:
        if not self._identified(conn):
            return
        if conn.lurk and self._still_lurking(conn):
            until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(conn.lurk_until / 1000))
            reason = (f"New identity — sending unlocks at {until}" if conn.lurk_until
                      else "Persistent identity required to send messages")
            return self._error(conn, p.LURK_MODE, reason)
        now = time.monotonic()
        if now - conn.last_msg < self._interval:
            return self._error(conn, p.RATE_LIMITED,
                               "Rate limit exceeded (max 1 message per second)")
        conn.last_msg = now
        to = msg["to"]
        targets = self._targets(conn, to)
        if targets is None:
            return
        text = p.encode({"type": p.MSG, "ts": _now_ms(), "from": conn.agent_id,
                         "from_name": conn.name, "to": to, "content": msg["content"],
                         "msg_id": f"{_now_ms()}-{next(self._msg_ids):x}", "verified": False})
        if to.startswith("#"):  # kept before anyone can see it
            verb = p.first_word(msg["content"])
            if verb not in UNREPLAYED:
                self._history.add(to, text[:-1] + ',"replay":true}', verb)
            deaf = self._muted.get(to, {}).get(verb)
            if deaf:  # the sender still gets its echo
                targets = [ws for ws in targets if ws not in deaf or ws is conn.ws]
        frame = _ws.text_frame(text)
        for ws in targets:
            ws.send_frame(frame)
        self._counts["msgs_relayed"] += 1
        self._counts["frames_fanned_out"] += len(targets)

    def _targets(self, conn: _Conn, to: str) -> Any:
        """The connections a MSG goes to (sender included), or None after an ERROR."""
        if to[0] == "#":
            members = self._channels.get(to)
            if members is None:
                return self._error(conn, p.CHANNEL_NOT_FOUND, f"Channel {to} not found")
            if conn.ws not in members:
                return self._error(conn, p.NOT_INVITED, f"Not a member of {to}")
            return members.keys()
        target = self._by_id.get(to)
        if target is None:
            return self._error(conn, p.AGENT_NOT_FOUND, f"Agent {to} not found")
        return (target.ws,) if target is conn else (target.ws, conn.ws)

    def _still_lurking(self, conn: _Conn) -> bool:
        if conn.lurk_until and _now_ms() >= conn.lurk_until:
            conn.lurk = False
        return conn.lurk

    def _on_ping(self, conn: _Conn, msg: dict) -> None:
        self._send(conn, {"type": p.PONG})

    def _on_list_agents(self, conn: _Conn, msg: dict) -> None:
        if not self._identified(conn):
            return
        name = msg["channel"]
        members = self._channels.get(name)
        if members is None:
            return self._error(conn, p.CHANNEL_NOT_FOUND, f"Channel {name} not found")
        agents = [{"id": m.agent_id, "name": m.name, "presence": "online",
                   "status_text": None, "verified": False} for m in members.values()]
        self._send(conn, {"type": p.AGENTS, "channel": name, "list": agents})

    def _on_list_channels(self, conn: _Conn, msg: dict) -> None:
        channels = [{"name": n, "agents": len(m)} for n, m in self._channels.items()]
        self._send(conn, {"type": p.CHANNELS, "list": channels})


def _parse_pubkey(pem: object) -> Ed25519PublicKey | None:
    if not isinstance(pem, str):
        return None
    try:
        key = serialization.load_pem_public_key(pem.encode("utf-8"))
    except (ValueError, TypeError):
        return None
    return key if isinstance(key, Ed25519PublicKey) else None


def _verify(chal: _Challenge, signature_b64: str, timestamp: int | float) -> bool:
    """Check the VERIFY_IDENTITY signature; the timestamp is formatted as JS would."""
    if isinstance(timestamp, float) and timestamp.is_integer():
        timestamp = int(timestamp)
    data = p.auth_string(chal.nonce, chal.cid, timestamp).encode("utf-8")  # type: ignore[arg-type]
    try:
        chal.key.verify(base64.b64decode(signature_b64), data)
    except (ValueError, binascii.Error, InvalidSignature):
        return False
    return True


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while n:
        n, r = divmod(n, 36)
        out = digits[r] + out
    return out or "0"


# -- command line ----------------------------------------------------------------------

def _write_port_file(path: Path, port: int) -> None:
    """Atomically publish the port (temp + rename) so a reader never sees a partial file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{port}\n", encoding="ascii")
    os.replace(tmp, path)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m agentctl_swarm.agentchat.relay",
                                     description="Run the embedded agentchat relay.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--rate-limit", type=float, default=1.0,
                        help="MSGs per second per connection (0 = unlimited)")
    parser.add_argument("--lurk", action="store_true", help="refuse MSGs from new identities")
    parser.add_argument("--port-file", type=Path, help="write the bound port here")
    parser.add_argument("--history-file", type=Path,
                        help="keep the channel history replayed to joiners in this file")
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    relay = Relay(args.host, args.port, rate_limit=args.rate_limit, lurk=args.lurk,
                  history_file=args.history_file)
    await relay.start()
    log.info("relay listening on %s", relay.url)
    if args.port_file is not None:
        _write_port_file(args.port_file, relay.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("relay stopping (%d connections)", relay.stats()["connections"])
    await relay.stop()


def main(argv: list[str] | None = None) -> int:
    """Run the relay until SIGTERM/SIGINT; exit 0 on a clean stop, 1 if it cannot bind."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("websockets").setLevel(logging.WARNING)
    try:
        asyncio.run(_serve(args))
    except OSError as exc:
        print(f"relay: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
