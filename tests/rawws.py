"""A raw WebSocket client for tests, from the websockets library itself.

Tests that play a hostile or naive peer use the library's own client rather than the
product's ``agentchat._ws``, so the relay is checked against an independent
implementation. websockets >= 13 has ``websockets.asyncio.client``; 10.x-12.x (Debian
12 ships 10.4) only the legacy one, with the same ``send``/``recv``/``close`` calls.
"""
from __future__ import annotations

from typing import Any

from websockets.exceptions import ConnectionClosed

try:
    from websockets.asyncio.client import connect as _connect
    from websockets.asyncio.server import serve as _serve
except ImportError:  # websockets < 13
    from websockets.legacy.client import connect as _connect  # type: ignore[no-redef]
    from websockets.legacy.server import serve as _serve  # type: ignore[no-redef]

__all__ = ["ConnectionClosed", "close_code", "connect", "serve"]


def connect(url: str, **kw: Any) -> Any:
    """Open a client connection (await it); compression off, as agentchat peers use."""
    kw.setdefault("compression", None)
    return _connect(url, **kw)


def serve(handler: Any, host: str, port: int, **kw: Any) -> Any:
    """A server calling ``handler(ws)`` per connection (``async with`` it)."""
    kw.setdefault("compression", None)
    return _serve(handler, host, port, **kw)


def close_code(exc: ConnectionClosed) -> int | None:
    """The close code the peer sent, or None if no close frame was received."""
    return exc.rcvd.code if exc.rcvd is not None else None


async def send_text_bytes(ws: Any, data: bytes) -> None:
    """Send ``data`` as a *text* frame unchecked (e.g. invalid UTF-8)."""
    try:
        await ws.send(data, text=True)  # websockets >= 14
    except TypeError:
        await ws.write_frame(True, 0x1, data)  # the legacy protocol's raw frame writer
