"""The pure parts of the agentchat wire protocol."""
from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentctl_swarm.agentchat import protocol as p


@pytest.mark.parametrize("name, ok", [
    ("a", True), ("swarm-builder-003", True), ("A_b-9", True), ("x" * 32, True),
    ("", False), ("x" * 33, False), ("has space", False), ("é", False), ("a.b", False),
    (None, False), (7, False), ("a\n", False),
])
def test_names(name, ok) -> None:
    assert p.is_valid_name(name) is ok


@pytest.mark.parametrize("channel, ok", [
    ("#agents", True), ("#" + "x" * 31, True), ("#a", True),
    ("#", False), ("#" + "x" * 32, False), ("agents", False), ("##a", False),
    ("#a b", False), (None, False), ("#a\n", False),
])
def test_channels(channel, ok) -> None:
    assert p.is_valid_channel(channel) is ok


def test_auth_string_is_exact() -> None:
    assert p.auth_string("n0", "chal_1", 1700000000000) == "AGENTCHAT_AUTH|n0|chal_1|1700000000000"


def test_max_frame_is_two_mebibytes() -> None:
    assert p.MAX_FRAME_BYTES == 2 * 1024 * 1024


def test_encode_is_compact_json() -> None:
    text = p.encode({"type": "MSG", "to": "#a", "content": "héllo"})
    assert text == '{"type":"MSG","to":"#a","content":"héllo"}'


@pytest.mark.parametrize("data, message", [
    ("{not json", "Invalid JSON"), ("[1, 2]", "not an object"), ('"s"', "not an object"),
    (b"\xff\xfe{}", "UTF-8"), ("", "Invalid JSON"),
])
def test_decode_errors(data, message) -> None:
    with pytest.raises(p.ProtocolError, match=message):
        p.decode(data)


def test_decode_accepts_bytes_and_leaves_type_to_caller() -> None:
    assert p.decode('{"a":1}'.encode()) == {"a": 1}
    assert p.decode('{"type":"NOPE"}') == {"type": "NOPE"}


@given(st.dictionaries(st.text(max_size=8), st.one_of(st.text(), st.integers(), st.booleans()),
                       max_size=6))
def test_encode_decode_round_trip(msg) -> None:
    assert p.decode(p.encode(msg)) == msg
    assert p.decode(p.encode(msg).encode("utf-8")) == msg


@pytest.mark.parametrize("msg, error", [
    ({}, "Missing message type"),
    ({"type": "BOGUS"}, "Unknown message type: BOGUS"),
    ({"type": "IDENTIFY", "name": "bad name"}, "Invalid agent name"),
    ({"type": "IDENTIFY", "name": "ok"}, None),
    ({"type": "JOIN", "channel": "agents"}, "Invalid channel name"),
    ({"type": "JOIN", "channel": "#agents"}, None),
    ({"type": "LIST_AGENTS"}, "Invalid channel name"),
    ({"type": "MSG", "content": "x"}, "Missing target"),
    ({"type": "MSG", "to": "agents", "content": "x"}, "Invalid target"),
    ({"type": "MSG", "to": "#agents"}, "Missing or invalid content"),
    ({"type": "MSG", "to": "#agents", "content": 5}, "Missing or invalid content"),
    ({"type": "MSG", "to": "@abc", "content": ""}, None),
    ({"type": "VERIFY_IDENTITY", "signature": "s", "timestamp": 1}, "challenge_id"),
    ({"type": "VERIFY_IDENTITY", "challenge_id": "c", "timestamp": 1}, "signature"),
    ({"type": "VERIFY_IDENTITY", "challenge_id": "c", "signature": "s"}, "timestamp"),
    ({"type": "VERIFY_IDENTITY", "challenge_id": "c", "signature": "s", "timestamp": "1"},
     "timestamp"),
    ({"type": "VERIFY_IDENTITY", "challenge_id": "c", "signature": "s", "timestamp": 1}, None),
    ({"type": "PING"}, None),
])
def test_validate_client(msg, error) -> None:
    result = p.validate_client(msg)
    if error is None:
        assert result is None
    else:
        assert result is not None and error in result


def test_error_codes_are_the_real_servers() -> None:
    codes = {p.AUTH_REQUIRED, p.CHANNEL_NOT_FOUND, p.NOT_INVITED, p.INVALID_MSG,
             p.RATE_LIMITED, p.AGENT_NOT_FOUND, p.VERIFICATION_FAILED,
             p.VERIFICATION_EXPIRED, p.LURK_MODE}
    assert all(code == code.upper() and " " not in code for code in codes)
    assert json.loads(p.encode({"code": p.RATE_LIMITED}))["code"] == "RATE_LIMITED"
