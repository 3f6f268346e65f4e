"""Supervisor <-> daemon messages over a private socketpair.

Framing: a 4-byte big-endian length, then that many bytes of UTF-8 JSON holding one
object with a ``"t"`` (type) key. Frames larger than ``MAX_FRAME`` are refused.

The supervisor treats everything a daemon sends as untrusted input (a daemon runs
the agent session, where a model acts): ``check_from_daemon`` validates each
message's type and fields and raises ``IpcError`` on anything unexpected, so the
caller logs one line and drops the frame (or the daemon) instead of crashing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import struct
from typing import Any, Callable

log = logging.getLogger(__name__)
MAX_FRAME = 256 * 1024
_HEADER = struct.Struct(">I")

# Types a daemon may send, and the fields each must carry: name -> (type, required).
_STR, _INT, _NUM, _BOOL, _DICT, _LIST = str, int, (int, float), bool, dict, list
FROM_DAEMON: dict[str, dict[str, tuple[Any, bool]]] = {
    "hello": {"pid": (_INT, True), "name": (_STR, True)},
    "ready": {"agent_id": (_STR, True), "lurk": (_BOOL, False), "confined": (_STR, False),
              "boot_ms": (_DICT, False)},
    "heartbeat": {"status": (_STR, True), "connected": (_BOOL, True), "queued": (_INT, False)},
    "link": {"event": (_STR, True), "detail": (_DICT, False)},
    "promote": {"task_id": (_STR, True)},
    "session_started": {"task_id": (_STR, True), "pid": (_INT, True)},
    "session_ended": {"task_id": (_STR, True), "outcome": (_STR, True), "reason": (_STR, True),
                      "summary": (_STR, False), "tokens": (_INT, True), "cost_usd": (_NUM, True),
                      "quota": (_BOOL, False), "retriable": (_BOOL, False),
                      "usage": (_DICT, False)},
    "interrupted": {"task_id": (_STR, True), "started": (_STR, False)},
    "log": {"level": (_STR, True), "msg": (_STR, True), "task": (_STR, False), "event": (_STR, False)},
    "fatal": {"reason": (_STR, True)},
}
_MAX_STRING = 16 * 1024
# Where a boot's time goes, as "ready" reports it in ``boot_ms``, from the boot message
# on: the workspace and identity, the sandbox, connecting (to WELCOME and JOINED). Nothing
# earlier: the daemon runs before the supervisor learns its PID, so its own clock would
# overlap the supervisor's "spawn".
BOOT_PHASES = ("prepare", "confine", "connect")


class IpcError(Exception):
    """A frame that is not a valid message."""


def encode(msg: dict[str, Any]) -> bytes:
    body = json.dumps(msg, separators=(",", ":"), ensure_ascii=False).encode()
    if len(body) > MAX_FRAME:
        raise IpcError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _HEADER.pack(len(body)) + body


def decode(body: bytes) -> dict[str, Any]:
    try:
        msg = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise IpcError(f"not JSON: {type(exc).__name__}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("t"), str):
        raise IpcError("not an object with a string 't'")
    return msg


def check_from_daemon(msg: dict[str, Any]) -> dict[str, Any]:
    """Validate a message a daemon sent; return it or raise IpcError."""
    spec = FROM_DAEMON.get(msg["t"])
    if spec is None:
        raise IpcError(f"unknown message type {msg['t'][:40]!r}")
    for key, (kind, required) in spec.items():
        if key not in msg:
            if required:
                raise IpcError(f"{msg['t']}: missing {key!r}")
            continue
        value = msg[key]
        if not _type_ok(value, kind):
            raise IpcError(f"{msg['t']}: {key!r} has the wrong type")
        if isinstance(value, str) and len(value) > _MAX_STRING:
            raise IpcError(f"{msg['t']}: {key!r} is too long")
    extra = set(msg) - set(spec) - {"t"}
    if extra:
        raise IpcError(f"{msg['t']}: unexpected fields {sorted(extra)[:5]}")
    return msg


def _type_ok(value: Any, kind: Any) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    # bool is a subclass of int: refuse True where a number is expected; and no NaN/inf.
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return not isinstance(value, bool) and isinstance(value, kind)


class Channel(asyncio.Protocol):
    """One end of a framed-JSON socketpair, driven by the event loop."""

    def __init__(self, on_message: Callable[[dict[str, Any]], None],
                 on_close: Callable[[Exception | None], None]) -> None:
        self._on_message = on_message
        self._on_close = on_close
        self._buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while len(self._buf) >= 4:
            (size,) = _HEADER.unpack_from(self._buf)
            if size > MAX_FRAME:
                self._abort(IpcError(f"peer sent a {size}-byte frame"))
                return
            if len(self._buf) < 4 + size:
                return
            body = bytes(self._buf[4:4 + size])
            del self._buf[:4 + size]
            try:
                msg = decode(body)
            except IpcError as exc:
                self._abort(exc)
                return
            try:
                self._on_message(msg)
            except Exception:  # noqa: BLE001 - a bug in one handler must not cut the peer off
                log.exception("IPC handler failed on a %r message", msg.get("t"))

    def _abort(self, exc: Exception) -> None:
        self._buf.clear()
        if self.transport is not None:
            self.transport.abort()
        self._on_close(exc)
        self._on_close = lambda exc: None

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_close(exc)

    def send(self, msg: dict[str, Any]) -> bool:
        """Queue a message; False when the channel is already closed."""
        if self.transport is None or self.transport.is_closing():
            return False
        self.transport.write(encode(msg))
        return True

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def open_channel(sock: socket.socket, on_message: Callable[[dict[str, Any]], None],
                       on_close: Callable[[Exception | None], None]) -> Channel:
    """Attach an already-connected socket to the running loop as a Channel."""
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_unix_connection(lambda: Channel(on_message, on_close), sock=sock)
    return proto
