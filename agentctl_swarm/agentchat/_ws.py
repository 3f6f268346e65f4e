"""WebSocket connections as plain asyncio protocols, on websockets' sans-I/O core.

Design note.  A swarm of N daemons on one channel receives N² heartbeat frames per
interval, so the cost of *one received frame* decides the swarm's idle CPU. The
asyncio layers of ``websockets`` spend ~160 µs a frame here (a task wake-up, a
message assembler, a future per ``recv``); this module keeps the parts of
``websockets`` that are hard to get right (the HTTP upgrade, frame parsing and
validation, close handshake, ping/pong, size limits: its sans-I/O
``ClientProtocol``/``ServerProtocol``) and drives them from
``asyncio.Protocol.data_received`` directly, calling ``on_text`` synchronously for
each message: no task, no future, no queue on the hot path.  On the sending side,
``text_frame`` encodes a server frame once so that the relay writes the same bytes
to N transports (server frames are unmasked and compression is never negotiated,
so they are identical for every receiver), and ``send_frame`` batches: frames
written to one connection during one turn of the event loop leave in one
``write`` at the end of the turn, so a burst of N channel messages costs each
receiver one wake-up and the relay one system call per receiver, not N.

A receiver that wants fewer wake-ups sets ``read_gap``: an isolated message is
still handled at once, but after two reads closer than ``read_gap`` the socket is
left unread until ``read_gap`` has passed, so a stream of messages is read in
batches (one wake-up per gap) instead of one wake-up per message.

Before ``on_text`` is set, messages queue for ``await recv()``, which is what a
handshake wants.  Works with websockets 10.4 (Debian 12, where the sans-I/O classes
are called ``ClientConnection``/``ServerConnection``) through 17.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any

from websockets.frames import Frame, Opcode
from websockets.uri import WebSocketURI, parse_uri

try:  # websockets >= 11
    from websockets.client import ClientProtocol
    from websockets.protocol import State
    from websockets.server import ServerProtocol
except ImportError:  # websockets 10.x
    from websockets.client import ClientConnection as ClientProtocol  # type: ignore[no-redef]
    from websockets.connection import State  # type: ignore[no-redef]
    from websockets.server import ServerConnection as ServerProtocol  # type: ignore[no-redef]

__all__ = ["ConnectionClosed", "WebSocket", "adopt", "connect", "open_upgraded", "serve", "text_frame"]

log = logging.getLogger(__name__)

TEXT, BINARY, CONT, PONG = Opcode.TEXT, Opcode.BINARY, Opcode.CONT, Opcode.PONG
OPEN = State.OPEN
CLOSE_TIMEOUT = 2.0   # s to wait for the peer's close frame / TCP close
MAX_WRITE_BUFFER = 16 * 1024 * 1024  # a peer this far behind is cut off, not buffered forever


class ConnectionClosed(Exception):
    """The connection is closed; ``code`` is the close code the peer sent, or None."""

    def __init__(self, code: int | None, reason: str = "") -> None:
        super().__init__(f"connection closed ({code} {reason})".strip())
        self.code, self.reason = code, reason


def text_frame(text: str) -> bytes:
    """One unmasked text frame (what a server sends), to write to many connections."""
    return Frame(TEXT, text.encode("utf-8")).serialize(mask=False)


class WebSocket(asyncio.Protocol):
    """One WebSocket connection; see the module docstring."""

    def __init__(self, proto: Any, *, on_open: Callable[[WebSocket], None] | None = None,
                 open_timeout: float = 10.0, batch: _Batch | None = None) -> None:
        self.proto = proto
        self._batch = batch
        self._out: list[bytes] = []   # frames waiting for their batch to be flushed
        self._urgent = False
        self.on_text: Callable[[str | bytes], None] | None = None
        self.on_close: Callable[[WebSocket], None] | None = None
        self.transport: asyncio.Transport | None = None
        self.open = False
        self._on_open, self._open_timeout = on_open, open_timeout
        self._loop = asyncio.get_running_loop()
        self.handshake: asyncio.Future[None] = self._loop.create_future()
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self._inbox: deque[str | bytes] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._parts: list[bytes] | None = None   # a fragmented message being assembled
        self._parts_size = 0
        self._text_message = False  # the fragmented message began as a text frame
        self._timer: asyncio.TimerHandle | None = None
        self._ping_timer: asyncio.TimerHandle | None = None
        self._awaiting_pong = False
        self.read_gap = 0.0
        self._last_read = float("-inf")
        self._resume_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=MAX_WRITE_BUFFER)  # type: ignore[attr-defined]
        if self.proto.state is OPEN:  # an adopted connection (see adopt): no handshake
            self.open = True
            self.handshake.set_result(None)
            return
        self._timer = self._loop.call_later(self._open_timeout, self._open_timed_out)
        if isinstance(self.proto, ClientProtocol):
            self.proto.send_request(self.proto.connect())
            self._flush()

    def data_received(self, data: bytes) -> None:
        proto = self.proto
        proto.receive_data(data)
        events = proto.events_received()
        writes = proto.data_to_send()
        if writes:
            self._write(writes)
        for event in events:
            if type(event) is Frame:
                self._on_frame(event)
            else:
                self._on_handshake(event)
        if proto.close_expected():
            self._closing()
        elif self.read_gap:
            self._pace_reads()

    def eof_received(self) -> bool | None:
        self._receive_eof()
        self._flush()
        return None  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self._receive_eof()
        self.open = False
        for timer in (self._timer, self._ping_timer, self._resume_timer):
            if timer is not None:
                timer.cancel()
        if not self.handshake.done():
            self.handshake.set_exception(ConnectionError(f"connection lost during the "
                                                         f"WebSocket handshake ({exc or 'EOF'})"))
            self.handshake.exception()  # retrieved: a lost handshake is reported by connect()
        if not self.closed.done():
            self.closed.set_result(None)
        self._wake()
        if self.on_close is not None:
            self.on_close(self)

    # -- public API --------------------------------------------------------------------

    @property
    def close_code(self) -> int | None:
        """The close code the peer sent (None if it sent no close frame)."""
        rcvd = self.proto.close_rcvd
        return rcvd.code if rcvd is not None else None

    @property
    def close_reason(self) -> str:
        rcvd = self.proto.close_rcvd
        return rcvd.reason if rcvd is not None else ""

    async def recv(self) -> str | bytes:
        """The next message (only while ``on_text`` is None); ConnectionClosed at the end."""
        while not self._inbox:
            if self.closed.done():
                raise ConnectionClosed(self.close_code, self.close_reason)
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._inbox.popleft()

    def take_inbox(self) -> list[str | bytes]:
        """Messages that arrived before ``on_text`` was set."""
        items, self._inbox = list(self._inbox), deque()
        return items

    def send(self, text: str) -> None:
        """Send one text message now (written to the transport, never awaited)."""
        if not self.open:
            raise ConnectionClosed(self.close_code, self.close_reason)
        self.proto.send_text(text.encode("utf-8"))
        self._flush()

    def send_frame(self, frame: bytes, urgent: bool = False) -> None:
        """Queue a frame made by ``text_frame`` (server side).

        It leaves with the batch (see ``_Batch``), or at the end of this loop turn if
        ``urgent`` (a reply this peer is waiting for), after whatever was queued first.
        """
        if not self.open:
            return
        if self._batch is None:
            self._write_now(frame)
            return
        if not self._out:
            self._batch.add(self)
        self._out.append(frame)
        if urgent and not self._urgent:
            self._urgent = True
            self._loop.call_soon(self.flush_frames)

    def flush_frames(self) -> None:
        """Write the queued frames in one call; cut off a peer that is far behind."""
        self._urgent = False
        out, self._out = self._out, []
        if out and self.open:
            self._write_now(b"".join(out) if len(out) > 1 else out[0])

    def _write_now(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        transport.write(data)
        if transport.get_write_buffer_size() >= MAX_WRITE_BUFFER:
            log.warning("websocket: peer is %d bytes behind; closing it",
                        transport.get_write_buffer_size())
            self.abort()

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake; the transport closes when it ends or times out."""
        if self.open:
            self.proto.send_close(code, reason)
            self._flush()
            self._closing()
        elif self.transport is not None and not self.closed.done():
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection at once (a dead or misbehaving peer)."""
        self.open = False
        if self.transport is not None:
            self.transport.abort()

    async def wait_closed(self) -> None:
        await asyncio.shield(self.closed)

    def keepalive(self, interval: float | None) -> None:
        """Ping every ``interval`` s; a peer that has not answered the last ping is dropped."""
        if interval:
            self._ping_timer = self._loop.call_later(interval, self._ping, interval)

    # -- internals ---------------------------------------------------------------------

    def _on_frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is TEXT or opcode is BINARY or opcode is CONT:
            if frame.fin and self._parts is None:
                data: bytes = frame.data
            else:
                if not self._collect(frame):
                    return
                data = b"".join(self._parts)  # type: ignore[arg-type]
                self._parts = None
            if opcode is TEXT or opcode is CONT and self._text_message:
                try:
                    message: str | bytes = data.decode("utf-8")
                except UnicodeDecodeError:
                    self.close(1007, "invalid UTF-8")
                    return
            else:
                message = data
            if self.on_text is not None:
                self.on_text(message)
            else:
                self._inbox.append(message)
                self._wake()
        elif opcode is PONG:
            self._awaiting_pong = False

    def _collect(self, frame: Frame) -> bool:
        """Add a fragment; False until the message is complete (or after failing it)."""
        if self._parts is None:
            self._parts, self._parts_size = [], 0
            self._text_message = frame.opcode is TEXT
        self._parts.append(frame.data)
        self._parts_size += len(frame.data)
        max_size = getattr(self.proto, "max_size", None)  # 10.x; 17 limits whole messages itself
        if max_size is not None and self._parts_size > max_size:
            self._parts = None
            self.close(1009, "message too big")
            return False
        return frame.fin

    def _on_handshake(self, event: Any) -> None:
        proto = self.proto
        if isinstance(proto, ServerProtocol):
            response = proto.accept(event)
            proto.send_response(response)
            self._flush()
            if response.status_code != 101:
                self._closing()
                return
        elif getattr(proto, "handshake_exc", None) is not None or event.status_code != 101:
            self.handshake.set_exception(ConnectionError(
                f"WebSocket handshake refused: HTTP {event.status_code}"))
            self.handshake.exception()
            self._closing()
            return
        if proto.state.name != "OPEN":
            self._closing()
            return
        self.open = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.handshake.set_result(None)
        if self._on_open is not None:
            self._on_open(self)

    def _pace_reads(self) -> None:
        now = self._loop.time()
        if now - self._last_read < self.read_gap and self._resume_timer is None:
            self.transport.pause_reading()  # type: ignore[union-attr]
            self._resume_timer = self._loop.call_later(self.read_gap, self._resume_reading)
        self._last_read = now

    def read_at_once(self) -> None:
        """Read what is waiting now, not at the end of the gap (an awaited reply is due)."""
        if self._resume_timer is not None:
            self._resume_timer.cancel()
            self._resume_reading()

    def _resume_reading(self) -> None:
        # Counted as a read: what waited is read now, in this same wake-up, and if the
        # stream goes on, the next read pauses again, so a stream costs one wake-up per gap.
        self._resume_timer = None
        self._last_read = self._loop.time()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def _open_timed_out(self) -> None:
        self._timer = None
        if not self.open:
            log.debug("websocket: opening handshake timed out")
            self.abort()

    def _closing(self) -> None:
        """The TCP connection should end soon; make sure it does."""
        if self._timer is None and self.transport is not None:
            self._timer = self._loop.call_later(CLOSE_TIMEOUT, self.transport.abort)
        self.open = False

    def _ping(self, interval: float) -> None:
        self._ping_timer = None
        if not self.open:
            return
        if self._awaiting_pong:
            log.info("websocket: no pong within %ss; dropping the connection", interval)
            self.abort()
            return
        self._awaiting_pong = True
        self.proto.send_ping(b"")
        self._flush()
        self._ping_timer = self._loop.call_later(interval, self._ping, interval)

    def _receive_eof(self) -> None:
        if not self.proto.reader.eof:  # websockets 10.x raises on a second EOF
            self.proto.receive_eof()

    def _flush(self) -> None:
        writes = self.proto.data_to_send()
        if writes:
            self._write(writes)

    def _write(self, writes: list[bytes]) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._out:  # keep the order: batched frames were sent first
            self.flush_frames()
        for data in writes:
            if data:
                transport.write(data)
            elif transport.can_write_eof():
                transport.write_eof()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Batch:
    """Connections with queued frames, flushed together.

    The first frames after a quiet spell leave at the end of this loop turn; while
    frames keep coming, flushes are at least ``cork`` apart (a write coalescing
    window, like Nagle's): a start-up burst of N heartbeats then costs each member
    one write per window instead of one per heartbeat.
    """

    def __init__(self, cork: float = 0.0) -> None:
        self._dirty: list[WebSocket] = []
        self.cork = cork
        self._last = float("-inf")

    def add(self, ws: WebSocket) -> None:
        if not self._dirty:
            loop = asyncio.get_running_loop()
            at = self._last + self.cork
            if at > loop.time():
                loop.call_at(at, self.flush)
            else:
                loop.call_soon(self.flush)
        self._dirty.append(ws)

    def flush(self) -> None:
        self._last = asyncio.get_running_loop().time()
        dirty, self._dirty = self._dirty, []
        for ws in dirty:
            ws.flush_frames()


async def connect(url: str, *, max_size: int | None = 2 ** 21, open_timeout: float = 10.0,
                  keepalive: float | None = None) -> WebSocket:
    """Open a client connection to ``ws://`` or ``wss://`` ``url`` and complete the handshake."""
    uri = parse_uri(url)
    loop = asyncio.get_running_loop()
    ctx = ssl.create_default_context() if uri.secure else None
    transport = None
    try:
        async with asyncio.timeout(open_timeout):
            transport, ws = await loop.create_connection(
                lambda: WebSocket(ClientProtocol(uri, max_size=max_size),
                                  open_timeout=open_timeout),
                uri.host, uri.port, ssl=ctx)
            await ws.handshake
    except BaseException:
        if transport is not None:
            transport.abort()
        raise
    ws.keepalive(keepalive)
    return ws


async def open_upgraded(url: str, *, max_size: int | None = 2 ** 21,
                        timeout: float = 10.0) -> tuple[socket.socket, dict[str, Any], bytes]:
    """Connect to ``ws://`` ``url`` and complete the opening handshake, for a process that
    hands the connection over (``adopt``) instead of using it: the supervisor opens
    each daemon's first relay connection, where the HTTP machinery is warm.

    Drives the sans-I/O protocol on the bare socket, so that nothing is read past
    what the protocol was given. Returns the socket, the parsed URI's fields (for
    ``adopt``) and the bytes received after the 101 response (normally none: a
    server waits for the client to speak). ``wss://`` cannot be handed over (the TLS
    state stays here): ValueError."""
    uri = parse_uri(url)
    if uri.secure:
        raise ValueError("a wss:// connection cannot be handed over")
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        try:  # an address (the embedded relay's): no resolver thread in the caller
            found = socket.getaddrinfo(uri.host, uri.port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_NUMERICHOST)
        except socket.gaierror:
            found = await loop.getaddrinfo(uri.host, uri.port, type=socket.SOCK_STREAM)
        family, kind, proto_num, _, address = found[0]
        sock = socket.socket(family, kind, proto_num)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
            proto = ClientProtocol(uri, max_size=max_size)
            proto.send_request(proto.connect())
            for data in proto.data_to_send():
                await loop.sock_sendall(sock, data)
            events: list[Any] = []
            while not events:  # until the response is parsed
                data = await loop.sock_recv(sock, 65536)
                if not data:
                    raise ConnectionError("the server closed the connection during the handshake")
                proto.receive_data(data)
                events = proto.events_received()
            if proto.state is not OPEN or getattr(proto, "handshake_exc", None) is not None:
                raise ConnectionError(f"WebSocket handshake refused: HTTP {events[0].status_code}")
        except BaseException:
            sock.close()
            raise
    after = [e.serialize(mask=False) for e in events[1:]]  # frames that came with the 101
    return sock, dict(vars(uri)), b"".join(after) + bytes(proto.reader.buffer)  # (asdict: a deep copy)


async def adopt(sock: socket.socket, uri: dict[str, Any], received: bytes = b"", *,
                max_size: int | None = 2 ** 21, keepalive: float | None = None) -> WebSocket:
    """A client WebSocket on a connection ``open_upgraded`` opened (possibly in another
    process): ``uri`` and ``received`` are what it returned. No HTTP is parsed here."""
    proto = ClientProtocol(WebSocketURI(**uri), max_size=max_size, state=OPEN)
    sock.setblocking(False)
    sock.set_inheritable(False)  # (it may have been passed across an exec)
    _, ws = await asyncio.get_running_loop().create_connection(lambda: WebSocket(proto), sock=sock)
    if received:
        ws.data_received(received)
    ws.keepalive(keepalive)
    return ws


async def serve(on_open: Callable[[WebSocket], None], host: str, port: int, *,
                max_size: int | None = 2 ** 21, open_timeout: float = 10.0,
                backlog: int = 4096, cork: float = 0.0) -> asyncio.Server:
    """Listen; ``on_open(ws)`` is called synchronously once a client's handshake is done.

    ``cork``: the least time between two flushes of ``send_frame`` batches (see _Batch).
    """
    loop = asyncio.get_running_loop()
    batch = _Batch(cork)
    return await loop.create_server(
        lambda: WebSocket(ServerProtocol(max_size=max_size), on_open=on_open,
                          open_timeout=open_timeout, batch=batch),
        host, port, backlog=backlog)
