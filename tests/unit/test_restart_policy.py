"""Restart rules, table-driven: backoff, reset after stable uptime, degraded."""

from __future__ import annotations

import json

import pytest

from agentctl_swarm.restart_policy import Backoff, GiveUp, Restart, RestartPolicy, RestartTracker


@pytest.mark.parametrize("attempt,delay", [
    (1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (9, 256.0), (10, 300.0), (11, 300.0), (500, 300.0),
])
def test_delay_doubles_up_to_the_cap(attempt: int, delay: float) -> None:
    assert RestartPolicy().delay(attempt) == delay


def run(events: list[tuple[str, float]], policy: RestartPolicy | None = None) -> list[object]:
    """Feed ("start"|"exit", time) events; return the decisions of the exits."""
    tracker = RestartTracker(policy or RestartPolicy())
    out: list[object] = []
    for kind, now in events:
        if kind == "start":
            tracker.on_start(now)
        else:
            out.append(tracker.on_exit(now))
    return out


# Each case: (events, expected decisions). A crash right after a start is "s t, e t+1".
CASES = {
    "first crash waits 1s": (
        [("start", 0), ("exit", 10)], [Restart(1.0, 1)]),
    "quick crashes back off 1,2,4": (
        [("start", 0), ("exit", 1), ("start", 2), ("exit", 3), ("start", 5), ("exit", 6)],
        [Restart(1.0, 1), Restart(2.0, 2), Restart(4.0, 3)]),
    "5 minutes of uptime resets the attempt": (
        [("start", 0), ("exit", 1), ("start", 2), ("exit", 3), ("start", 5), ("exit", 305)],
        [Restart(1.0, 1), Restart(2.0, 2), Restart(1.0, 1)]),
    "just under 5 minutes does not reset": (
        [("start", 0), ("exit", 1), ("start", 2), ("exit", 301.9)],
        [Restart(1.0, 1), Restart(2.0, 2)]),
    "the 6th restart within 30 minutes gives up": (
        [e for t in range(6) for e in (("start", t * 100.0), ("exit", t * 100.0 + 1))],
        [Restart(1.0, 1), Restart(2.0, 2), Restart(4.0, 3), Restart(8.0, 4), Restart(16.0, 5),
         GiveUp("more than 5 restarts in 1800s")]),
    "slow flapping (every 6 min, stable each time) still degrades": (
        [e for t in range(6) for e in (("start", t * 340.0), ("exit", t * 340.0 + 330))],
        [Restart(1.0, 1)] * 5 + [GiveUp("more than 5 restarts in 1800s")]),
    "restarts spread over more than 30 minutes never degrade": (
        [e for t in range(8) for e in (("start", t * 400.0), ("exit", t * 400.0 + 1))],
        [Restart(1.0, 1), Restart(2.0, 2), Restart(4.0, 3), Restart(8.0, 4), Restart(16.0, 5),
         Restart(32.0, 6), Restart(64.0, 7), Restart(128.0, 8)]),
    "degraded is sticky": (
        [e for t in range(7) for e in (("start", t * 10.0), ("exit", t * 10.0 + 1))],
        [Restart(1.0, 1), Restart(2.0, 2), Restart(4.0, 3), Restart(8.0, 4), Restart(16.0, 5),
         GiveUp("more than 5 restarts in 1800s"), GiveUp("more than 5 restarts in 1800s")]),
    "exit without a recorded start does not reset": (
        [("exit", 0), ("exit", 1000)], [Restart(1.0, 1), Restart(2.0, 2)]),
    "a clock that went back drops future entries from the window": (
        [e for t in range(5) for e in (("start", 10_000 + t), ("exit", 10_000 + t))]
        + [("start", 0), ("exit", 1)],
        [Restart(1.0, 1), Restart(2.0, 2), Restart(4.0, 3), Restart(8.0, 4), Restart(16.0, 5),
         Restart(32.0, 6)]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_restart_rules(name: str) -> None:
    events, expected = CASES[name]
    assert run(events) == expected


def test_custom_policy() -> None:
    policy = RestartPolicy(base=0.1, cap=0.3, stable_after=10, window=100, max_in_window=2)
    events = [("start", 0), ("exit", 0), ("start", 1), ("exit", 1), ("start", 2), ("exit", 2)]
    assert run(events, policy) == [Restart(0.1, 1), Restart(0.2, 2), GiveUp(
        "more than 2 restarts in 100s")]


def test_restart_count_is_the_total_and_reset_clears_degraded() -> None:
    tracker = RestartTracker(RestartPolicy(max_in_window=1))
    assert tracker.on_exit(0) == Restart(1.0, 1)
    assert isinstance(tracker.on_exit(1), GiveUp)
    assert tracker.restart_count == 1 and tracker.degraded
    tracker.reset()
    assert tracker.degraded is None
    assert tracker.on_exit(2) == Restart(1.0, 1)
    assert tracker.restart_count == 2


def test_history_survives_a_json_round_trip() -> None:
    tracker = RestartTracker()
    for t in (0.0, 10.0, 20.0):
        tracker.on_start(t)
        tracker.on_exit(t + 1)
    tracker.on_start(30.0)
    restored = RestartTracker.from_dict(json.loads(json.dumps(tracker.to_dict())))
    assert restored.to_dict() == tracker.to_dict()
    # The restored tracker continues the same schedule: the 4th restart waits 8 s.
    assert restored.on_exit(31.0) == Restart(8.0, 4)


@pytest.mark.parametrize("data", [
    None, [], {"attempt": -1}, {"attempt": True}, {"recent": "x"}, {"recent": [float("nan")]},
    {"restart_count": 1.5}, {"started_at": "yesterday"}, {"degraded": 3},
])
def test_from_dict_refuses_bad_shapes(data: object) -> None:
    with pytest.raises(ValueError):
        RestartTracker.from_dict(data)


def test_from_dict_accepts_empty_object() -> None:
    assert RestartTracker.from_dict({}).to_dict() == RestartTracker().to_dict()


def test_reconnect_backoff_schedule() -> None:
    backoff = Backoff(base=1.0, cap=30.0)
    assert [backoff.next() for _ in range(8)] == [1, 2, 4, 8, 16, 30, 30, 30]
    assert backoff.attempts == 8
    backoff.reset()
    assert backoff.next() == 1 and backoff.attempts == 1


def test_backoff_survives_huge_attempt_counts() -> None:
    backoff = Backoff()
    backoff.attempts = 10_000
    assert backoff.next() == 30.0


@pytest.mark.parametrize("kwargs", [{"base": 0}, {"base": 5, "cap": 1}, {"factor": 0.5}])
def test_backoff_refuses_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(**kwargs)
