"""The CLI's side of the control socket."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from ..errors import SwarmError


class NotRunning(SwarmError):
    """No supervisor answers on the control socket."""


def _token(path: Path) -> str:
    """The running supervisor's control token (only its owner can read it)."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        raise NotRunning(f"agentctl-swarm is not running (no {path})") from None
    except PermissionError:
        raise SwarmError(f"{path}: permission denied (is the swarm someone else's?)") from None


def call(path: Path, cmd: str, args: dict[str, Any] | None = None, timeout: float = 30.0) -> dict[str, Any]:
    """Send one command; return the reply. Raises NotRunning when nobody listens."""
    token = _token(path.parent / "control.token")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise NotRunning(f"agentctl-swarm is not running (no {path})") from None
        except ConnectionRefusedError:
            raise NotRunning(f"agentctl-swarm is not running (nothing listens on {path})") from None
        except PermissionError:
            raise SwarmError(f"{path}: permission denied (is the swarm someone else's?)") from None
        sock.sendall(json.dumps({"cmd": cmd, "args": args or {}, "token": token}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except socket.timeout:
        raise SwarmError(f"the supervisor did not answer {cmd!r} within {timeout:.0f}s") from None
    finally:
        sock.close()
    if not data:
        raise NotRunning("agentctl-swarm is not running (the control socket closed)")
    return json.loads(data)
