"""The agentchat client that runs inside every daemon (and the supervisor).

Design note.  Up to 1000 of these run at once, so the client is two tasks for
its whole life — ``run()`` (connect, handshake, then wait for the end) and one
sender — plus timers.  Once joined, frames go from the socket's
``data_received`` straight to ``_on_frame`` (see ``_ws``): nothing is created per
message and an idle client is asleep on its socket.  ``read_gap`` batches reads
under a stream of frames, except while queued MSGs wait on an echo.  Keepalive
pings default to one a minute; the daemons turn them off, since the echo of
every heartbeat proves the link anyway.

Delivery: outgoing MSGs wait in one bounded FIFO.  The sender transmits one at a
time and waits for its *echo*: the real server (and the relay) relays a channel
MSG to every member including the sender and echoes a DM back, so the echo is an
acknowledgement.  Frames on one connection are answered in order, so an ERROR
arriving while a MSG is in flight is that MSG's refusal: ``RATE_LIMITED`` puts
it back at the head of the queue (never lost, never reordered), anything else
(``LURK_MODE``, ``NOT_INVITED``…) drops it with a ``send_refused`` event.  The
next MSG goes ``send_interval`` after the echo (not after the send), so the
server — which stamps the time when it accepts a MSG — never sees two closer
than the interval.  A MSG in flight when the connection drops is put back at
the head and sent again after reconnecting (at-least-once).  If no echo comes
within ``ack_timeout`` the link is taken for dead (a frozen or half-open peer):
the connection is aborted, the MSG stays at the head of the queue and is sent
again after reconnecting. An idle daemon heartbeats every interval, so a dead
relay is noticed within one interval plus ``ack_timeout``.

Own echoes are not passed to ``on_message``; nor are the real server's replays
of channel history (``replay: true``) unless ``deliver_replay``.

``ignore_heartbeats`` (the daemons): others' HEARTBEAT lines are of no use to
this client. Where the server offers the ``mute`` extension (our relay), the
JOINs ask it not to send them at all; elsewhere they are dropped unparsed.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from agentctl_swarm.agentchat import _ws
from agentctl_swarm.agentchat import protocol as p
from agentctl_swarm.agentchat.identity import Identity

log = logging.getLogger(__name__)

Backoff = Callable[[int], float]


def default_backoff(attempt: int) -> float:
    """Seconds to wait before reconnect attempt ``attempt`` (1-based): 1, 2, 4, … 30."""
    return float(min(2 ** max(attempt - 1, 0), 30))


def _noop(event: str, data: dict) -> None:
    return None


class ChannelNotAllowed(Exception):
    """``send`` to a target this client was not configured for."""


class _AttemptFailed(Exception):
    """One connect/handshake attempt failed; the message says why."""


_TYPE_PREFIX = '{"type":"'
_HEARTBEAT_MARK = '"content":"HEARTBEAT '
_HANDLED = frozenset({p.MSG, p.ERROR, p.SESSION_DISPLACED})  # what _handle acts on


_JOINED_PREFIX = f'{_TYPE_PREFIX}{p.JOINED}",'
_CHANNEL_KEY = '"channel":"'


def _joined_channel(raw: str | bytes) -> str | None:
    """The channel of a JOINED frame in the compact layout our relay and agentchat
    write, read without parsing the member list that follows it (a list of every
    member: in a swarm starting 500 daemons each joiner would build hundreds of
    dicts only to drop them). None for anything else, which is parsed as usual. The
    key must come before any nested object or list, and a quote inside a JSON
    string is always escaped, so a member's fields cannot be taken for it."""
    if type(raw) is not str or not raw.startswith(_JOINED_PREFIX):
        return None
    key = raw.find(_CHANNEL_KEY, len(_JOINED_PREFIX))
    if key < 0 or "{" in raw[len(_JOINED_PREFIX):key] or "[" in raw[len(_JOINED_PREFIX):key]:
        return None
    try:
        channel, _ = json.decoder.scanstring(raw, key + len(_CHANNEL_KEY))
    except ValueError:
        return None
    return channel


class AgentChatClient:
    """A reconnecting, paced agentchat client; see the module docstring."""

    def __init__(self, url: str, identity: Identity, channels: list[str], *,
                 on_message: Callable[[dict], None],
                 on_event: Callable[[str, dict], None] = _noop,
                 send_interval: float = 1.0, backoff: Backoff = default_backoff,
                 report_after: int = 5, allow_direct: bool = False, max_queue: int = 1000,
                 handshake_timeout: float = 10.0, ack_timeout: float = 10.0,
                 keepalive: float | None = 60.0, deliver_replay: bool = False,
                 read_gap: float = 0.0, ignore_heartbeats: bool = False,
                 handover: tuple[Any, dict[str, Any], bytes] | None = None) -> None:
        bad = [c for c in channels if not p.is_valid_channel(c)]
        if bad:
            raise ValueError(f"invalid channel names: {', '.join(map(repr, bad))}")
        self._url, self._identity = url, identity
        self._channels = list(dict.fromkeys(channels))
        self._on_message, self._on_event = on_message, on_event
        self._interval, self._backoff = send_interval, backoff
        self._report_after, self._allow_direct = max(report_after, 1), allow_direct
        self._max_queue, self._hs_timeout = max_queue, handshake_timeout
        self._ack_timeout, self._keepalive = ack_timeout, keepalive
        self._deliver_replay = deliver_replay
        self._read_gap = read_gap
        self._ignore_heartbeats = ignore_heartbeats
        self._handover = handover  # a connection _ws.open_upgraded opened for us: used first
        self._own_from = ""  # '"from":"<our id>"', once identified
        self._can_mute = False  # the server offers the "mute" extension (WELCOME.features)
        self._queue: deque[tuple[str, str]] = deque()
        self._inflight: tuple[str, str] | None = None
        self._ack_timer: asyncio.TimerHandle | None = None
        self._next_send = 0.0
        self._ws: Any = None
        self._ready = False
        self._closing = False
        self._connected_evt = asyncio.Event()
        self._kick = asyncio.Event()
        self._stop = asyncio.Event()
        self._run_task: asyncio.Task | None = None
        self._agent_id: str | None = None
        self._lurk = False
        self._lurk_until: int | None = None

    # -- public API --------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._ready

    @property
    def agent_id(self) -> str | None:
        return self._agent_id

    @property
    def lurk(self) -> bool:
        return self._lurk

    @property
    def queued(self) -> int:
        """MSGs not yet acknowledged (queued plus the one in flight)."""
        return len(self._queue) + (self._inflight is not None)

    def send(self, to: str, content: str) -> None:
        """Queue a MSG (non-blocking; call from the event loop's thread)."""
        if to.startswith("@") and not self._allow_direct or not to.startswith("@") and to not in self._channels:
            log.warning("agentchat %s: refused a send to %s: not an assigned channel",
                        self._identity.name, to[:64])
            raise ChannelNotAllowed(f"{to[:64]} is not one of this client's channels")
        if not isinstance(content, str):
            raise TypeError("content must be str")
        if len(content.encode("utf-8")) > p.MAX_FRAME_BYTES - 1024:
            raise ValueError("content too long for one agentchat frame")
        if len(self._queue) >= self._max_queue:
            dropped = self._queue.popleft()
            log.warning("agentchat %s: send queue full (%d); dropped oldest MSG to %s",
                        self._identity.name, self._max_queue, dropped[0])
        self._queue.append((to, content))
        self._kick.set()

    async def wait_connected(self, timeout: float) -> bool:
        """True once identified and joined; False if ``timeout`` passes first."""
        if self._ready:
            return True
        try:
            async with asyncio.timeout(timeout):
                await self._connected_evt.wait()
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Stop reconnecting, close the connection and let ``run()`` return."""
        if self._closing:
            return
        self._closing = True
        self._stop.set()
        self._kick.set()
        ws = self._ws
        if ws is not None:
            ws.close(1000, "client closing")
            with suppress(TimeoutError):
                async with asyncio.timeout(_ws.CLOSE_TIMEOUT + 1):
                    await ws.wait_closed()
        task = self._run_task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
            with suppress(asyncio.CancelledError, TimeoutError):
                async with asyncio.timeout(5):
                    await asyncio.shield(task)

    async def run(self) -> None:
        """Connect, identify, join and read; reconnect with backoff until close()."""
        self._run_task = asyncio.current_task()
        sender = asyncio.get_running_loop().create_task(self._sender())
        try:
            await self._reconnect_loop()
        except asyncio.CancelledError:
            if not self._closing:
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
        finally:
            sender.cancel()
            self._lost("client closed", report=False)

    # -- connection --------------------------------------------------------------------

    async def _reconnect_loop(self) -> None:
        failures = 0
        while not self._closing:
            try:
                await self._session()
                failures = 0
            except _AttemptFailed as exc:
                failures += 1
                log.info("agentchat %s: connect attempt %d failed: %s",
                         self._identity.name, failures, exc)
                if failures % self._report_after == 0:
                    self._emit("reconnect_failed", {"attempts": failures})
            if self._closing:
                return
            await self._pause(self._backoff(max(failures, 1)))

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once on close()."""
        with suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stop.wait()

    async def _session(self) -> None:
        """One connection: returns after a ready connection is lost, raises if never ready."""
        ws = await self._open()
        try:
            async with asyncio.timeout(self._hs_timeout):
                await self._handshake(ws)
                await self._join_all(ws)
        except (TimeoutError, _ws.ConnectionClosed, OSError, p.ProtocolError, KeyError,
                TypeError, _AttemptFailed) as exc:
            ws.abort()
            raise _AttemptFailed(f"handshake: {exc!r}") from None
        self._became_ready(ws)
        await self._read(ws)

    async def _open(self) -> _ws.WebSocket:
        handover, self._handover = self._handover, None
        try:
            if handover is not None:
                sock, uri, received = handover
                return await _ws.adopt(sock, uri, received, max_size=2 * p.MAX_FRAME_BYTES,
                                       keepalive=self._keepalive)
            return await _ws.connect(self._url, max_size=2 * p.MAX_FRAME_BYTES,
                                     open_timeout=self._hs_timeout, keepalive=self._keepalive)
        except Exception as exc:  # refused, DNS, HTTP status, timeout: all one failure
            raise _AttemptFailed(f"connect {self._url}: {exc!r}") from None

    async def _handshake(self, ws: _ws.WebSocket) -> None:
        ident = self._identity
        ws.send(p.encode({"type": p.IDENTIFY, "name": ident.name,
                                "pubkey": ident.pubkey_pem}))
        chal = await self._expect(ws, p.CHALLENGE)
        stamp = int(time.time() * 1000)
        cid = str(chal["challenge_id"])
        sig = ident.sign_auth(str(chal["nonce"]), cid, stamp)
        ws.send(p.encode({"type": p.VERIFY_IDENTITY, "challenge_id": cid,
                                "signature": sig, "timestamp": stamp}))
        welcome = await self._expect(ws, p.WELCOME)
        self._agent_id = str(welcome["agent_id"])
        self._own_from = f'"from":{json.dumps(self._agent_id)}'
        self._lurk = bool(welcome.get("lurk", False))
        self._lurk_until = welcome.get("lurk_until")
        features = welcome.get("features")
        self._can_mute = isinstance(features, list) and p.FEATURE_MUTE in features
        if self._lurk:
            log.warning("agentchat %s: %s is in lurk mode (until %s): the server may refuse "
                        "its messages", ident.name, self._agent_id, self._lurk_until)

    async def _expect(self, ws: _ws.WebSocket, mtype: str) -> dict:
        """Read until a frame of ``mtype``; an ERROR first fails the attempt."""
        while True:
            msg = p.decode(await ws.recv())
            if msg.get("type") == mtype:
                return msg
            if msg.get("type") == p.ERROR:
                self._emit("error", _error_data(msg))
                raise _AttemptFailed(f"{msg.get('code')}: {msg.get('message')}")

    async def _join_all(self, ws: _ws.WebSocket) -> None:
        """Pipeline every JOIN; each gets JOINED or an ERROR, in order."""
        pending = list(self._channels)
        join: dict[str, Any] = {"type": p.JOIN}
        if self._ignore_heartbeats and self._can_mute:
            join["mute"] = ["HEARTBEAT"]
        for channel in pending:
            ws.send(p.encode({**join, "channel": channel}))
        while pending:
            raw = await ws.recv()
            joined = _joined_channel(raw)
            if joined in pending:
                pending.remove(joined)
                continue
            msg = p.decode(raw)
            mtype = msg.get("type")
            if mtype == p.JOINED and msg.get("channel") in pending:
                pending.remove(msg["channel"])
            elif mtype == p.ERROR:
                channel = pending.pop(0)
                log.error("agentchat %s: cannot join %s: %s %s", self._identity.name,
                          channel, msg.get("code"), msg.get("message"))
                self._emit("error", {**_error_data(msg), "channel": channel})
            else:
                self._handle_safely(msg)

    def _became_ready(self, ws: _ws.WebSocket) -> None:
        self._ws, self._ready = ws, True
        self._connected_evt.set()
        self._emit("connected", {"agent_id": self._agent_id, "lurk": self._lurk,
                                 "lurk_until": self._lurk_until})
        self._kick.set()

    async def _read(self, ws: _ws.WebSocket) -> None:
        """Frames now go straight from the socket to ``_on_frame``; wait for the end."""
        reason = "connection closed"
        try:
            for raw in ws.take_inbox():
                self._on_frame(raw)
            ws.on_text = self._on_frame
            ws.read_gap = self._read_gap
            await ws.wait_closed()
        finally:
            ws.on_text = None
            if not ws.closed.done():
                ws.abort()
            if ws.close_code is not None:
                reason = f"closed with code {ws.close_code} {ws.close_reason or ''}".strip()
            self._lost(reason, report=not self._closing)

    def _lost(self, reason: str, *, report: bool) -> None:
        """Forget the connection; the MSG in flight goes back to the head of the queue."""
        was_ready = self._ready
        self._ready, self._ws = False, None
        self._connected_evt.clear()
        if self._inflight is not None:
            self._queue.appendleft(self._inflight)
            self._inflight = None
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        if was_ready and report:
            log.warning("agentchat %s: disconnected: %s", self._identity.name, reason)
            self._emit("disconnected", {"reason": reason})

    # -- incoming ----------------------------------------------------------------------

    def _on_frame(self, raw: str | bytes) -> None:
        """Handle one frame; nothing a server or a callback does may escape into run()."""
        if type(raw) is str and self._skippable(raw):
            return
        try:
            msg = p.decode(raw)
        except p.ProtocolError as exc:
            log.warning("agentchat %s: ignoring malformed frame: %s", self._identity.name, exc)
            return
        self._handle_safely(msg)

    def _skippable(self, raw: str) -> bool:
        """A frame we would parse only to drop: presence notices, and others' heartbeats
        when ``ignore_heartbeats``. In a swarm starting N daemons each daemon is sent ~N
        of each; parsing is most of what they cost it. Decided on the compact layout
        our relay and agentchat write (``{"type":"X",...``, ``"content":"HEARTBEAT ``);
        a frame laid out otherwise is parsed. Inside a JSON string every quote is
        escaped, so a message cannot fake these structural patterns."""
        if not raw.startswith(_TYPE_PREFIX):
            return False
        end = raw.find('"', len(_TYPE_PREFIX), 64)
        if end < 0:
            return False
        kind = raw[len(_TYPE_PREFIX):end]
        if kind != p.MSG:
            return kind not in _HANDLED
        return (self._ignore_heartbeats and _HEARTBEAT_MARK in raw
                and not (self._own_from and self._own_from in raw))

    def _handle_safely(self, msg: dict) -> None:
        try:
            self._handle(msg)
        except Exception:
            log.exception("agentchat %s: error handling a %s frame", self._identity.name,
                          msg.get("type"))

    def _handle(self, msg: dict) -> None:
        mtype = msg.get("type")
        if mtype == p.MSG:
            self._handle_msg(msg)
        elif mtype == p.ERROR:
            self._handle_error(msg)
        elif mtype == p.SESSION_DISPLACED:
            log.warning("agentchat %s: session displaced: %s", self._identity.name,
                        msg.get("reason"))
            self._emit("error", {"code": p.SESSION_DISPLACED, "message": msg.get("reason")})

    def _handle_msg(self, msg: dict) -> None:
        if msg.get("replay") and not self._deliver_replay:
            return
        if msg.get("from") == self._agent_id:
            inflight = self._inflight
            if inflight is not None and msg.get("to") == inflight[0]:
                self._settle()
            return
        self._on_message(msg)

    def _handle_error(self, msg: dict) -> None:
        code, inflight = msg.get("code"), self._inflight
        if inflight is None:
            log.warning("agentchat %s: server error %s: %s", self._identity.name, code,
                        msg.get("message"))
            self._emit("error", _error_data(msg))
        elif code == p.RATE_LIMITED:
            log.debug("agentchat %s: rate limited; resending", self._identity.name)
            self._queue.appendleft(inflight)
            self._settle()
        else:
            log.warning("agentchat %s: server refused MSG to %s: %s %s", self._identity.name,
                        inflight[0], code, msg.get("message"))
            self._settle()
            self._emit("send_refused", {"to": inflight[0], "code": code,
                                        "message": msg.get("message")})

    # -- outgoing ----------------------------------------------------------------------

    def _settle(self) -> None:
        """The MSG in flight is answered; the next may go one interval from now."""
        self._inflight = None
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        self._next_send = asyncio.get_running_loop().time() + self._interval
        self._kick.set()

    def _ack_timed_out(self, item: tuple[str, str]) -> None:
        if self._inflight is not item:
            return
        log.warning("agentchat %s: no echo for MSG to %s within %ss; the link looks dead, "
                    "reconnecting", self._identity.name, item[0], self._ack_timeout)
        self._ack_timer = None
        if self._ws is not None:
            self._ws.abort()  # _read() sees the close; _lost() requeues the MSG in flight

    async def _sender(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._kick.wait()
            self._kick.clear()
            while self._ready and self._queue and self._inflight is None:
                delay = self._next_send - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                    continue
                await self._transmit(self._queue.popleft())

    async def _transmit(self, item: tuple[str, str]) -> None:
        self._inflight = item
        self._ack_timer = asyncio.get_running_loop().call_later(
            self._ack_timeout, self._ack_timed_out, item)
        # A backlog waits on this echo: read without the gap until the queue is empty.
        self._ws.read_gap = 0.0 if self._queue else self._read_gap
        if self._queue:
            self._ws.read_at_once()
        try:
            self._ws.send(p.encode({"type": p.MSG, "to": item[0], "content": item[1]}))
        except _ws.ConnectionClosed:
            pass  # _read() sees the close and _lost() requeues the MSG in flight

    def _emit(self, event: str, data: dict) -> None:
        try:
            self._on_event(event, data)
        except Exception:
            log.exception("agentchat %s: on_event(%s) raised", self._identity.name, event)


def _error_data(msg: dict) -> dict:
    return {"code": msg.get("code"), "message": msg.get("message")}
