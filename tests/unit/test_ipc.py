"""The supervisor's IPC decoder treats a daemon as untrusted (issue 5).

Properties: arbitrary bytes or JSON into ``ipc.decode`` + ``ipc.check_from_daemon``
give a valid message or ``IpcError``, never another exception; ``Channel``
reassembles frames however the stream is chunked, and an oversized or
undecodable frame closes the channel once, with an ``IpcError``. Then the
supervisor's ``_on_ipc`` with every kind of bad message: dropped with one log
line, nothing raised into the event loop.
"""

from __future__ import annotations

import json
import logging
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from agentctl_swarm import ipc

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12)
TYPES = sorted(ipc.FROM_DAEMON) + ["approve", "boot", "__class__", "", "t" * 100]


def decode_and_check(body: bytes) -> dict[str, Any] | None:
    try:
        return ipc.check_from_daemon(ipc.decode(body))
    except ipc.IpcError:
        return None


@given(st.binary(max_size=512))
def test_arbitrary_bytes_are_a_message_or_an_ipc_error(body: bytes) -> None:
    decode_and_check(body)


@given(JSON)
def test_arbitrary_json_is_a_message_or_an_ipc_error(value: Any) -> None:
    decode_and_check(json.dumps(value).encode())


def daemon_like() -> st.SearchStrategy[dict[str, Any]]:
    """Objects shaped like daemon messages, with right, wrong and missing fields."""
    fields = st.sampled_from(sorted({k for spec in ipc.FROM_DAEMON.values() for k in spec} | {"x"}))
    return st.builds(lambda t, extra: {"t": t, **extra}, st.sampled_from(TYPES),
                     st.dictionaries(fields, JSON, max_size=8))


@given(daemon_like())
def test_daemon_shaped_messages_validate_exactly(msg: dict[str, Any]) -> None:
    checked = decode_and_check(json.dumps(msg).encode())
    if checked is None:
        return
    spec = ipc.FROM_DAEMON[checked["t"]]
    assert set(checked) - {"t"} <= set(spec)
    for key, (kind, required) in spec.items():
        assert key in checked or not required
        if key in checked:
            value = checked[key]
            assert isinstance(value, kind) and (kind is bool or not isinstance(value, bool)), (key, value)


def test_huge_strings_and_bool_for_int_are_refused() -> None:
    with pytest.raises(ipc.IpcError, match="too long"):
        ipc.check_from_daemon({"t": "fatal", "reason": "x" * (64 * 1024)})
    with pytest.raises(ipc.IpcError, match="wrong type"):
        ipc.check_from_daemon({"t": "session_started", "task_id": "a", "pid": True})
    with pytest.raises(ipc.IpcError, match="not JSON"):
        ipc.decode(b"\xff\xfe")


def test_deeply_nested_json_is_an_ipc_error() -> None:
    with pytest.raises(ipc.IpcError):
        ipc.decode(b"[" * 100000)


# ----------------------------------------------------------------- framing

class Transport:
    """The parts of an asyncio transport Channel uses."""

    def __init__(self) -> None:
        self.aborted = 0
        self.closing = False

    def abort(self) -> None:
        self.aborted += 1
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: bytes) -> None:
        pass


def feed(stream: bytes, cuts: list[int]) -> tuple[list[dict[str, Any]], list[Exception | None], Transport]:
    got: list[dict[str, Any]] = []
    closed: list[Exception | None] = []
    channel = ipc.Channel(got.append, closed.append)
    transport = Transport()
    channel.connection_made(transport)  # type: ignore[arg-type]
    start = 0
    for cut in sorted(set(c % (len(stream) + 1) for c in cuts)) + [len(stream)]:
        if transport.closing:
            break
        channel.data_received(stream[start:cut])
        start = cut
    return got, closed, transport


MESSAGES = st.lists(st.builds(lambda n, s: {"t": "log", "level": "info", "msg": s * n},
                              st.integers(0, 50), st.text(max_size=30)), min_size=1, max_size=8)


@given(MESSAGES, st.lists(st.integers(0, 10**6), max_size=20))
def test_frames_survive_any_chunking(msgs: list[dict[str, Any]], cuts: list[int]) -> None:
    stream = b"".join(ipc.encode(m) for m in msgs)
    got, closed, transport = feed(stream, cuts)
    assert got == msgs and closed == [] and transport.aborted == 0


@given(MESSAGES, st.integers(ipc.MAX_FRAME + 1, 2**32 - 1), st.lists(st.integers(0, 10**6), max_size=10))
def test_an_oversized_frame_closes_the_channel_once(msgs: list[dict[str, Any]], size: int,
                                                    cuts: list[int]) -> None:
    good = b"".join(ipc.encode(m) for m in msgs)
    stream = good + struct.pack(">I", size) + b"x" * 64 + ipc.encode(msgs[0])
    got, closed, transport = feed(stream, cuts)
    assert got == msgs, "messages before the bad frame are delivered, nothing after"
    assert len(closed) == 1 and isinstance(closed[0], ipc.IpcError) and transport.aborted == 1


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=1, max_size=300), st.lists(st.integers(0, 10**6), max_size=10))
def test_an_undecodable_frame_closes_the_channel(body: bytes, cuts: list[int]) -> None:
    try:
        ipc.decode(body)
        assume(False)
    except ipc.IpcError:
        pass
    got, closed, transport = feed(struct.pack(">I", len(body)) + body, cuts)
    assert got == [] and len(closed) == 1 and isinstance(closed[0], ipc.IpcError)


@given(st.binary(max_size=2000), st.lists(st.integers(0, 10**6), max_size=20))
def test_arbitrary_streams_never_raise(stream: bytes, cuts: list[int]) -> None:
    got, closed, _ = feed(stream, cuts)
    assert len(closed) <= 1
    assert all(isinstance(m, dict) and isinstance(m.get("t"), str) for m in got)


# ----------------------------------------------------------------- the supervisor's _on_ipc

@pytest.fixture
def supervisor(tmp_path):  # type: ignore[no-untyped-def]
    from agentctl_swarm.config import load_config
    from agentctl_swarm.paths import SwarmPaths
    from agentctl_swarm.supervisor import Slot, Supervisor
    from agentctl_swarm.restart_policy import RestartTracker
    cfg_path = tmp_path / "swarm.yaml"
    cfg_path.write_text("count: 1\n")
    paths = SwarmPaths(tmp_path / ".agentctl")
    paths.ensure()
    sup = Supervisor(load_config(cfg_path, home=tmp_path), paths=paths, config_arg=cfg_path)
    slot = Slot("swarm-general-001", "general", 1, tmp_path / "ws", RestartTracker())
    sup.slots[slot.name] = slot
    return sup, slot


BAD = [
    {"t": "heartbeat"},  # missing fields
    {"t": "heartbeat", "status": "idle", "connected": "yes"},
    {"t": "session_ended", "task_id": "x", "outcome": "done", "reason": "", "tokens": -5,
     "cost_usd": float("inf")},  # a task it was not running
    {"t": "session_started", "task_id": "../../etc", "pid": 1},
    {"t": "promote", "task_id": "no-such-task"},
    {"t": "approve", "task_id": "x"},  # supervisor-to-daemon type
    {"t": "_ipc_hello"}, {"t": "hello", "pid": 1, "name": "x", "extra": 1},
    {"t": "log", "level": "NOTALEVEL", "msg": "x"}, {"t": "log", "level": "", "msg": "%s %d"},
    {"t": "ready", "agent_id": "a" * 10000, "confined": 7},
    {"t": "interrupted", "task_id": "not-ours"},
    {"t": "link", "event": "error", "detail": {"a": [1] * 100}},
]


@pytest.mark.parametrize("msg", BAD, ids=[json.dumps(m)[:40] for m in BAD])
def test_on_ipc_drops_bad_messages_without_raising(supervisor, msg, caplog) -> None:  # type: ignore[no-untyped-def]
    sup, slot = supervisor
    sent: list[dict[str, Any]] = []
    slot.channel = type("C", (), {"send": lambda self, m: sent.append(m) or True})()
    before = (slot.status, slot.task_id, slot.session_pid, sup.coordinator.budget.used)
    with caplog.at_level(logging.INFO):
        sup._on_ipc(slot, msg)
    assert (slot.status, slot.task_id, slot.session_pid, sup.coordinator.budget.used) == before
    assert all(m.get("t") != "approve" for m in sent), sent


def test_a_non_finite_cost_is_dropped(supervisor) -> None:  # type: ignore[no-untyped-def]
    sup, slot = supervisor
    slot.channel = type("C", (), {"send": lambda self, m: True})()
    slot.task_id = "t1"
    body = b'{"t":"session_ended","task_id":"t1","outcome":"done","reason":"","tokens":1,"cost_usd":Infinity}'
    sup._on_ipc(slot, ipc.decode(body))
    assert sup.coordinator.budget.cost_usd == 0.0
