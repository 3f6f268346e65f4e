"""The control socket: a Unix stream socket, one JSON request and one reply per connection.

Only the swarm's owner may use it: the socket is created 0600 inside a 0700
directory, and every connection's peer credentials (``SO_PEERCRED``) must carry
our uid (or root's). Agent sessions run as the same user, and Landlock does not
govern connecting to a socket path, so two more checks keep them out: each
request carries the token from ``run/control.token`` (0600, in a directory no
session can read), and a peer whose session id, ancestry or cgroup is an agent's
is refused even with it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import logging
import os
import socket
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..state import write_text_atomic
from ..system.journal import log_fields
from . import commands

if TYPE_CHECKING:
    from ..supervisor import Supervisor

log = logging.getLogger("agentctl_swarm.control")
MAX_REQUEST = 64 * 1024
READ_TIMEOUT_S = 5.0


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", data)
    return pid, uid, gid


class ControlServer:
    """Serves ``agentctl`` commands for one supervisor."""

    def __init__(self, supervisor: "Supervisor", path: Path, token_path: Path) -> None:
        self.sup = supervisor
        self.path = path
        self.token_path = token_path
        self.token = secrets.token_hex(32)
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        write_text_atomic(self.token_path, self.token + "\n")
        old_umask = os.umask(0o177)
        try:
            self.server = await asyncio.start_unix_server(self._serve, path=str(self.path),
                                                          limit=MAX_REQUEST)
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for path in (self.path, self.token_path):
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            refusal = self._refusal(writer.get_extra_info("socket"))
            if refusal:
                log.warning("control connection refused: %s", refusal, extra=log_fields(event="control"))
                reply: dict[str, Any] = {"ok": False, "error": f"permission denied: {refusal}"}
            else:
                reply = await self._answer(reader)
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def _refusal(self, sock: socket.socket) -> str | None:
        pid, uid, _ = peer_credentials(sock)
        if uid not in (os.getuid(), 0):
            return f"uid {uid} is not the swarm's owner"
        if self.sup.is_agent_process(pid):
            return f"pid {pid} is an agent process"
        return None

    async def _answer(self, reader: asyncio.StreamReader) -> dict[str, Any]:
        try:
            line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT_S)
            request = json.loads(line)
        except (ValueError, asyncio.TimeoutError, asyncio.LimitOverrunError) as exc:
            return {"ok": False, "error": f"bad request: {type(exc).__name__}"}
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return {"ok": False, "error": "bad request: expected {\"cmd\": ..., \"args\": {...}}"}
        token = request.get("token")
        if not isinstance(token, str) or not hmac.compare_digest(token, self.token):
            log.warning("control request without the right token refused", extra=log_fields(event="control"))
            return {"ok": False, "error": "permission denied: missing or wrong control token"}
        args = request.get("args") if isinstance(request.get("args"), dict) else {}
        return await commands.run(self.sup, request["cmd"], args)
