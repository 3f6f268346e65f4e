"""A small shim over the two asyncio APIs of ``websockets``.

Design note.  Debian 12 ships websockets 10.4, which has only the *legacy* API
(``websockets.serve/connect/broadcast``; handlers are called with one argument
since 10.1, see ``legacy.server.remove_path_argument``).  websockets >= 13 has
the new API in ``websockets.asyncio.{server,client}``; the legacy one is
deprecated there.  Both share: the awaitable/async-context ``serve(...)``
returning an object with ``close()``, ``wait_closed()`` and ``sockets``; the
awaitable/async-context ``connect(...)``; ``recv``/``send``/``close`` and async
iteration on a connection; ``ConnectionClosed`` with ``rcvd``; and the keyword
arguments ``compression``, ``max_size``, ``max_queue``, ``ping_interval``,
``ping_timeout``, ``close_timeout``, ``write_limit``.  ``open_timeout`` exists on
both clients but only on the new server, so it is dropped for the legacy server.

Only what this package uses is exposed: ``serve``, ``connect``, ``broadcast``,
``ConnectionClosed``, ``close_code`` and ``is_open``.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from websockets.exceptions import ConnectionClosed

try:  # websockets >= 13
    from websockets.asyncio.client import connect as _connect
    from websockets.asyncio.server import broadcast as _broadcast
    from websockets.asyncio.server import serve as _serve

    LEGACY = False
except ImportError:  # websockets 10.x-12.x
    from websockets.legacy.client import connect as _connect  # type: ignore[no-redef]
    from websockets.legacy.protocol import broadcast as _broadcast  # type: ignore[no-redef]
    from websockets.legacy.server import serve as _serve  # type: ignore[no-redef]

    LEGACY = True

__all__ = ["LEGACY", "ConnectionClosed", "broadcast", "close_code", "connect", "is_open",
           "serve"]


def serve(handler: Callable[[Any], Awaitable[None]], host: str, port: int, **kw: Any) -> Any:
    """Start a server calling ``handler(ws)`` per connection; await it for the server."""
    if LEGACY:
        kw.pop("open_timeout", None)
    return _serve(handler, host, port, **kw)


def connect(url: str, **kw: Any) -> Any:
    """Open a client connection; await it (or ``async with`` it)."""
    return _connect(url, **kw)


def broadcast(conns: Iterable[Any], text: str) -> None:
    """Queue one text frame on every open connection without awaiting (no backpressure)."""
    if LEGACY:
        try:
            _broadcast(conns, text)
        except RuntimeError:  # a connection busy with a fragmented send; we never fragment
            pass
    else:
        _broadcast(conns, text)


def close_code(exc: ConnectionClosed) -> int | None:
    """The close code the peer sent, or None if no close frame was received."""
    return exc.rcvd.code if exc.rcvd is not None else None


def is_open(ws: Any) -> bool:
    """True while the connection can send (both APIs expose ``state``)."""
    return getattr(ws.state, "name", "") == "OPEN"
