"""agentchat._ws: the lean WebSocket transport, over real loopback sockets.

The peer on the other side is the websockets library's own client or server
(``tests.rawws``) wherever one is needed, so both directions are checked against an
independent implementation.
"""
from __future__ import annotations

import asyncio
import functools
import socket
import time

import pytest

from agentctl_swarm.agentchat import _ws
from tests import rawws


def arun(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 30))
    return wrapper


class Sink:
    """A server side that records what it gets."""

    def __init__(self) -> None:
        self.conns: list[_ws.WebSocket] = []
        self.got: list[str | bytes] = []
        self.opened = asyncio.Event()

    def on_open(self, ws: _ws.WebSocket) -> None:
        self.conns.append(ws)
        ws.on_text = self.got.append
        self.opened.set()

    async def serve(self, **kw) -> str:
        """Listen on loopback with ``_ws.serve``; returns the URL."""
        self.server = await _ws.serve(self.on_open, "127.0.0.1", 0, **kw)
        return f"ws://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"


async def until(pred, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@arun
async def test_library_client_round_trip_fragments_and_close_code() -> None:
    sink = Sink()
    url = await sink.serve(max_size=1000)
    async with rawws.connect(url) as ws:
        await ws.send("hello")
        await ws.send(["frag", "mented"])  # one message in three frames
        await until(lambda: sink.got == ["hello", "fragmented"])
        sink.conns[0].send("back")
        assert await asyncio.wait_for(ws.recv(), 5) == "back"
        frame = _ws.text_frame("pre-encoded")
        sink.conns[0].send_frame(frame)
        assert await asyncio.wait_for(ws.recv(), 5) == "pre-encoded"
        await ws.send(["x" * 600, "y" * 600])  # fragments that add up past max_size
        with pytest.raises(rawws.ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 5)
        assert rawws.close_code(info.value) == 1009
    await until(lambda: sink.conns[0].closed.done())
    sink.server.close()


@arun
async def test_client_against_library_server_and_clean_close() -> None:
    async def echo(ws) -> None:
        async for msg in ws:
            await ws.send(f"echo {msg}")

    async with rawws.serve(echo, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        ws = await _ws.connect(f"ws://127.0.0.1:{port}")
        ws.send("one")
        assert await ws.recv() == "echo one"
        got: list[str | bytes] = []
        ws.on_text = got.append  # callback mode: no recv() at all
        ws.send("two")
        await until(lambda: got == ["echo two"])
        ws.close(1000, "bye")
        await asyncio.wait_for(ws.wait_closed(), 5)
        with pytest.raises(_ws.ConnectionClosed):
            ws.send("after close")


@arun
async def test_keepalive_drops_a_peer_that_stops_answering() -> None:
    sink = Sink()
    url = await sink.serve()
    ws = await _ws.connect(url, keepalive=0.2)
    await sink.opened.wait()
    await asyncio.sleep(0.5)
    assert not ws.closed.done(), "a peer that answers pings must be kept"
    sink.conns[0].transport.pause_reading()  # frozen peer: no more pongs
    t0 = time.monotonic()
    await asyncio.wait_for(ws.wait_closed(), 5)
    assert time.monotonic() - t0 < 1.0
    sink.server.close()


@arun
async def test_a_reader_that_falls_too_far_behind_is_cut_off(monkeypatch) -> None:
    monkeypatch.setattr(_ws, "MAX_WRITE_BUFFER", 256 * 1024)
    sink = Sink()
    url = await sink.serve()
    ws = await _ws.connect(url)
    ws.transport.pause_reading()  # a stalled consumer
    await sink.opened.wait()
    frame = _ws.text_frame("z" * 4096)
    for _ in range(2000):  # 8 MB: more than the kernel buffers plus the limit
        sink.conns[0].send_frame(frame)
        if sink.conns[0].closed.done():
            break
        await asyncio.sleep(0)
    await until(lambda: sink.conns[0].closed.done())
    ws.abort()
    sink.server.close()


async def refusing(status: bytes) -> tuple[asyncio.Server, str]:
    """A plain HTTP server that answers every upgrade with ``status``; and its URL."""
    async def refuse(reader, writer) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    return server, f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"


def silent() -> tuple[socket.socket, str]:
    """A listening socket that accepts (in the kernel) and never answers; and its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock, f"ws://127.0.0.1:{sock.getsockname()[1]}"


@arun
async def test_connect_errors_are_clear() -> None:
    server, url = await refusing(b"404 Not Found")
    with pytest.raises(ConnectionError, match="HTTP 404"):
        await _ws.connect(url)
    server.close()

    listener, url = silent()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        await _ws.connect(url, open_timeout=0.3)
    assert time.monotonic() - t0 < 2
    listener.close()


@arun
async def test_fan_out_is_corked_under_a_stream_but_replies_are_not() -> None:
    sink = Sink()
    url = await sink.serve(cork=0.3)
    async with rawws.connect(url) as ws:
        await sink.opened.wait()
        conn = sink.conns[0]
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        conn.send_frame(_ws.text_frame("first"))  # after a quiet spell: this loop turn
        assert await asyncio.wait_for(ws.recv(), 5) == "first"
        assert loop.time() - t0 < 0.2
        conn.send_frame(_ws.text_frame("second"))  # a stream: waits for the cork window
        conn.send_frame(_ws.text_frame("third"))
        assert await asyncio.wait_for(ws.recv(), 5) == "second"
        assert await asyncio.wait_for(ws.recv(), 5) == "third"
        assert loop.time() - t0 >= 0.25
        t1 = loop.time()
        conn.send_frame(_ws.text_frame("fan-out"))  # corked again (last flush was just now)
        conn.send_frame(_ws.text_frame("reply"), urgent=True)  # takes the queue with it, in order
        assert await asyncio.wait_for(ws.recv(), 5) == "fan-out"
        assert await asyncio.wait_for(ws.recv(), 5) == "reply"
        assert loop.time() - t1 < 0.2
    sink.server.close()


@arun
async def test_a_connection_opened_here_is_adopted_there_with_what_followed_the_101() -> None:
    """open_upgraded stops at the handshake; adopt (as a daemon does with the socket the
    supervisor passed it) carries on. A server that writes its first frame in the same
    segment as its 101 must not lose it: those bytes travel with the socket."""
    from websockets.frames import Frame, Opcode

    async def eager(reader, writer) -> None:
        proto = _ws.ServerProtocol()  # the library's sans-I/O server (named per version in _ws)
        proto.receive_data(await reader.readuntil(b"\r\n\r\n"))
        request = proto.events_received()[0]
        proto.send_response(proto.accept(request))
        greeting = Frame(Opcode.TEXT, b"welcome").serialize(mask=False)
        writer.write(b"".join(proto.data_to_send()) + greeting)  # one write: 101 + frame
        await writer.drain()
        echo = await reader.read(4096)  # the adopted side's masked frame
        proto.receive_data(echo)
        got = [e.data for e in proto.events_received()]
        writer.write(Frame(Opcode.TEXT, b"echo:" + got[0]).serialize(mask=False))
        await writer.drain()
        await asyncio.sleep(0.5)
        writer.close()

    server = await asyncio.start_server(eager, "127.0.0.1", 0)
    url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    sock, uri, received = await _ws.open_upgraded(url)
    assert received.endswith(b"welcome") and uri["port"] == server.sockets[0].getsockname()[1]
    ws = await _ws.adopt(sock, uri, received)
    assert ws.open and await ws.recv() == "welcome"
    ws.send("hi")
    assert await ws.recv() == "echo:hi"
    ws.abort()
    server.close()


@arun
async def test_open_upgraded_refuses_clearly() -> None:
    server, url = await refusing(b"403 Forbidden")
    with pytest.raises(ConnectionError, match="HTTP 403"):
        await _ws.open_upgraded(url)
    server.close()
    with pytest.raises(ValueError, match="wss"):
        await _ws.open_upgraded("wss://127.0.0.1:1/")
    listener, url = silent()
    with pytest.raises(TimeoutError):
        await _ws.open_upgraded(url, timeout=0.3)
    listener.close()
