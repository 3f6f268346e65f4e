"""The agentchat wire protocol: names, limits, message types, error codes, framing.

Design note — what was verified against the real server, and where.
All facts below were read from the public source of ``tjamescouch/agentchat``
(npm ``@tjamescouch/agentchat``), files ``lib/protocol.ts``, ``lib/server.ts``,
``lib/identity.ts``, ``lib/server/handlers/identity.ts`` and
``lib/server/handlers/message.ts`` (commits 03d890af…, 4ef12943…):

* Frames are JSON text; every server frame carries ``ts`` (ms since the epoch).
* ``IDENTIFY {name, pubkey}`` → ``CHALLENGE {challenge_id, nonce, expires_at}``;
  nonce is 32 hex chars, challenge id ``chal_<ts36>_<8 hex>``, TTL 60 s.  When
  the challenge expires the server sends ``ERROR VERIFICATION_EXPIRED`` and
  closes the connection (1000).  A second IDENTIFY while one is pending or after
  WELCOME → ``ERROR INVALID_MSG``.  An IDENTIFY without pubkey is an ephemeral
  agent: WELCOME at once with a random 8-char id and ``lurk: true``.
* ``VERIFY_IDENTITY {challenge_id, signature, timestamp}``: unknown challenge →
  ``VERIFICATION_EXPIRED``; challenge of another connection → ``INVALID_MSG``;
  expired → ``VERIFICATION_EXPIRED``; bad signature → ``VERIFICATION_FAILED``
  (the challenge is discarded, the connection stays open and unidentified).  The
  signed bytes are UTF-8 ``AGENTCHAT_AUTH|<nonce>|<challenge_id>|<timestamp>``;
  the timestamp is not checked for freshness.
* ``agent_id`` is ``"@"`` + the first 16 hex digits of SHA-256 over the PEM
  string exactly as sent in IDENTIFY (``createHash('sha256').update(pubkey)``:
  the UTF-8 bytes of the whole PEM text, header, footer and trailing newline).
* WELCOME: ``{agent_id, name, server, verified, [lurk, lurk_until, lurk_reason]}``;
  the lurk fields appear only for identities first seen < 1 h ago; while lurking
  a MSG is refused with ``ERROR LURK_MODE`` (checked before the rate limit).
  With ``LURK_DISABLED=true`` the server still says ``lurk: true`` but accepts.
* A verified identity already connected elsewhere: the *new* connection wins;
  the old one gets ``SESSION_DISPLACED {reason}`` and is closed (1000).
* ``JOIN`` → ``JOINED {channel, agents: [{id, name, verified}]}``; the server
  also sends ``AGENT_JOINED`` to the others, replays buffered messages with
  ``replay: true`` and a ``@server`` welcome MSG.  Unknown channel →
  ``CHANNEL_NOT_FOUND`` (the real server only has its preset channels,
  ``#general #agents #engineering …``).  ``LEAVE`` → ``LEFT {channel}``.
* ``MSG {to, content}``: rate limit first (per connection, ``now - last <
  1000 ms`` → ``ERROR RATE_LIMITED``, message dropped; the slot is consumed by
  any MSG that passes the check, even one then refused), then channel exists
  (``CHANNEL_NOT_FOUND``) and membership (``NOT_INVITED``); relayed as ``MSG
  {from, from_name, to, content, msg_id, verified}`` to every member *including
  the sender*.  A DM to ``@id`` goes to the target and is echoed to the sender;
  absent target → ``AGENT_NOT_FOUND``.
* ``LIST_AGENTS {channel}`` → ``AGENTS {channel, list: [{id, name, presence,
  status_text, verified}]}``; ``PING`` → ``PONG``.
* Before WELCOME, JOIN/LEAVE/MSG/LIST_AGENTS → ``ERROR AUTH_REQUIRED``.
* Bad frames → ``ERROR INVALID_MSG`` (``Invalid JSON``, ``Missing message
  type``, ``Unknown message type: X``, field errors).  The WebSocket layer has
  ``maxPayload`` 2 MiB: a bigger frame closes the connection with 1009.
* Names: 1-32 of ``[A-Za-z0-9_-]``; channels ``#`` + 1-31 of the same.

One extension of our own, used only where the server offers it (the real server
does not): the embedded relay's WELCOME lists ``features: ["mute"]``, and then a
JOIN may carry ``mute: [VERB, ...]`` (``MUTE_VERB_RE``, at most ``MAX_MUTED``):
that member is no longer sent the channel's MSGs, live or replayed, whose
content starts with ``VERB`` and a space, except its own, which are still
echoed to it.  Each JOIN replaces the member's list; ``[]`` clears it.
"""
from __future__ import annotations

import json
import re
from typing import Any

NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
CHANNEL_RE = re.compile(r"#[A-Za-z0-9_-]{1,31}")
MAX_FRAME_BYTES = 2 * 1024 * 1024
FEATURE_MUTE = "mute"  # our relay's extension, advertised in WELCOME.features
MUTE_VERB_RE = re.compile(r"[A-Z][A-Z_]{0,23}")
MAX_MUTED = 8
AUTH_PREFIX = "AGENTCHAT_AUTH"
REAL_SERVER_RATE_LIMIT_S = 1.0

# Client → server message types.
IDENTIFY = "IDENTIFY"
VERIFY_IDENTITY = "VERIFY_IDENTITY"
JOIN = "JOIN"
LEAVE = "LEAVE"
MSG = "MSG"
PING = "PING"
LIST_AGENTS = "LIST_AGENTS"
LIST_CHANNELS = "LIST_CHANNELS"

# Server → client message types.
CHALLENGE = "CHALLENGE"
WELCOME = "WELCOME"
JOINED = "JOINED"
LEFT = "LEFT"
AGENT_JOINED = "AGENT_JOINED"
AGENT_LEFT = "AGENT_LEFT"
AGENTS = "AGENTS"
CHANNELS = "CHANNELS"
PONG = "PONG"
ERROR = "ERROR"
SESSION_DISPLACED = "SESSION_DISPLACED"

# Error codes (the real server's ErrorCode values used by this subset).
AUTH_REQUIRED = "AUTH_REQUIRED"
CHANNEL_NOT_FOUND = "CHANNEL_NOT_FOUND"
NOT_INVITED = "NOT_INVITED"
INVALID_MSG = "INVALID_MSG"
RATE_LIMITED = "RATE_LIMITED"
AGENT_NOT_FOUND = "AGENT_NOT_FOUND"
VERIFICATION_FAILED = "VERIFICATION_FAILED"
VERIFICATION_EXPIRED = "VERIFICATION_EXPIRED"
NOT_ALLOWED = "NOT_ALLOWED"
BANNED = "BANNED"
LURK_MODE = "LURK_MODE"

# WebSocket close codes the relay and the real server use.
CLOSE_NORMAL = 1000
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009

_CHANNEL_TYPES = frozenset({JOIN, LEAVE, LIST_AGENTS})


class ProtocolError(ValueError):
    """A frame that is not a JSON object; the message is what the server would say."""


def is_valid_name(name: object) -> bool:
    """True for an agent name the real server accepts."""
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None


def is_valid_channel(channel: object) -> bool:
    """True for a channel name the real server accepts."""
    return isinstance(channel, str) and CHANNEL_RE.fullmatch(channel) is not None


def auth_string(nonce: str, challenge_id: str, timestamp_ms: int) -> str:
    """The exact text signed in VERIFY_IDENTITY (``generateAuthSigningContent``)."""
    return f"{AUTH_PREFIX}|{nonce}|{challenge_id}|{timestamp_ms}"


def encode(msg: dict[str, Any]) -> str:
    """One compact JSON text frame; non-ASCII kept as is (smaller than \\u escapes)."""
    return json.dumps(msg, separators=(",", ":"), ensure_ascii=False)


def decode(data: str | bytes) -> dict[str, Any]:
    """Parse one frame into a dict; raise ProtocolError for anything else.

    Bytes must be valid UTF-8.  Whether ``type`` is present and known is left to
    the caller, which knows which types it accepts.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("Invalid UTF-8") from None
    try:
        msg = json.loads(data)
    except (ValueError, RecursionError):
        raise ProtocolError("Invalid JSON") from None
    if not isinstance(msg, dict):
        raise ProtocolError("Invalid JSON: not an object")
    return msg


def validate_client(msg: dict[str, Any]) -> str | None:
    """The real server's field checks for the subset; None if valid, else its error text."""
    mtype = msg.get("type")
    if not mtype:
        return "Missing message type"
    if mtype == IDENTIFY:
        return None if is_valid_name(msg.get("name")) else "Invalid agent name"
    if mtype in _CHANNEL_TYPES:
        if not is_valid_channel(msg.get("channel")):
            return "Invalid channel name"
        return _validate_mute(msg.get("mute")) if mtype == JOIN and "mute" in msg else None
    if mtype == MSG:
        return _validate_msg(msg)
    if mtype == VERIFY_IDENTITY:
        return _validate_verify(msg)
    if mtype in (PING, LIST_CHANNELS):
        return None
    return f"Unknown message type: {mtype}"


def _validate_mute(mute: Any) -> str | None:
    if (not isinstance(mute, list) or len(mute) > MAX_MUTED
            or not all(isinstance(v, str) and MUTE_VERB_RE.fullmatch(v) for v in mute)):
        return f"Invalid mute (a list of at most {MAX_MUTED} upper-case verbs)"
    return None


def first_word(content: str) -> str:
    """The verb a line starts with, as ``mute`` matches it ("" if none)."""
    head, space, _ = content.partition(" ")
    return head if space else ""


def _validate_msg(msg: dict[str, Any]) -> str | None:
    to = msg.get("to")
    if not to:
        return "Missing target"
    if not isinstance(to, str) or to[0] not in "#@":
        return "Invalid target (must start with # or @)"
    content = msg.get("content")
    if not isinstance(content, str):
        return "Missing or invalid content"
    if len(content) > MAX_FRAME_BYTES:
        return "Content too long (max 2MB)"
    return None


def _validate_verify(msg: dict[str, Any]) -> str | None:
    if not msg.get("challenge_id") or not isinstance(msg["challenge_id"], str):
        return "Missing or invalid challenge_id"
    if not msg.get("signature") or not isinstance(msg["signature"], str):
        return "Missing or invalid signature"
    stamp = msg.get("timestamp")
    if not stamp or isinstance(stamp, bool) or not isinstance(stamp, (int, float)):
        return "Missing or invalid timestamp"
    return None
