"""When to restart a crashed daemon, and when to stop trying. Pure: no clock, no I/O.

The rules (issue 2 §6): the n-th consecutive restart waits ``min(base * 2**(n-1), cap)``
seconds; ``n`` starts again after ``stable_after`` seconds of uptime; more than
``max_in_window`` restarts within ``window`` seconds mark the agent degraded and it
is not retried until someone resets it.  The caller passes the time in; use
``time.time()`` when the tracker is persisted (``to_dict``), because a monotonic
clock does not survive a reboot.  A timestamp from the future (the wall clock
went back) is dropped from the window rather than trusted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Union


@dataclass(frozen=True)
class RestartPolicy:
    """The numbers of the restart rules; defaults are the spec's."""

    base: float = 1.0
    cap: float = 300.0
    stable_after: float = 300.0
    window: float = 1800.0
    max_in_window: int = 5

    def delay(self, attempt: int) -> float:
        """Delay before the ``attempt``-th consecutive restart (1-based)."""
        return min(self.base * 2.0 ** min(attempt - 1, 64), self.cap)


@dataclass(frozen=True)
class Restart:
    """Restart after ``delay`` seconds; this is consecutive restart number ``attempt``."""

    delay: float
    attempt: int


@dataclass(frozen=True)
class GiveUp:
    """Do not restart: the agent is degraded."""

    reason: str


Decision = Union[Restart, GiveUp]


class RestartTracker:
    """The restart history of one slot; feed it starts and exits, it answers what to do."""

    def __init__(self, policy: RestartPolicy | None = None) -> None:
        self.policy = policy or RestartPolicy()
        self.attempt = 0
        self.restart_count = 0
        self.recent: list[float] = []
        self.started_at: float | None = None
        self.degraded: str | None = None

    def on_start(self, now: float) -> None:
        """The child is running (again) since ``now``."""
        self.started_at = now

    def on_exit(self, now: float) -> Decision:
        """The child crashed at ``now``: restart it (after a delay) or give up."""
        if self.degraded is not None:
            return GiveUp(self.degraded)
        if self.started_at is not None and now - self.started_at >= self.policy.stable_after:
            self.attempt = 0
        self.started_at = None
        self.recent = [t for t in self.recent if 0 <= now - t < self.policy.window]
        if len(self.recent) >= self.policy.max_in_window:
            self.degraded = (f"more than {self.policy.max_in_window} restarts in "
                             f"{self.policy.window:g}s")
            return GiveUp(self.degraded)
        self.attempt += 1
        self.restart_count += 1
        self.recent.append(now)
        return Restart(self.policy.delay(self.attempt), self.attempt)

    def reset(self) -> None:
        """Forget the history (an operator restarted the agent by hand)."""
        self.attempt, self.recent, self.degraded = 0, [], None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able snapshot, so restart history survives a supervisor restart."""
        return {"attempt": self.attempt, "restart_count": self.restart_count,
                "recent": list(self.recent), "started_at": self.started_at,
                "degraded": self.degraded}

    @classmethod
    def from_dict(cls, data: Any, policy: RestartPolicy | None = None) -> "RestartTracker":
        """Rebuild from :meth:`to_dict` output; ``ValueError`` if ``data`` is not that shape."""
        if not isinstance(data, dict):
            raise ValueError(f"restart history: expected an object, got {type(data).__name__}")
        tracker = cls(policy)
        tracker.attempt = _count(data.get("attempt", 0), "attempt")
        tracker.restart_count = _count(data.get("restart_count", 0), "restart_count")
        recent = data.get("recent", [])
        if not isinstance(recent, list):
            raise ValueError("restart history: recent: expected a list of times")
        tracker.recent = [_time(t, "recent") for t in recent]
        started = data.get("started_at")
        tracker.started_at = None if started is None else _time(started, "started_at")
        degraded = data.get("degraded")
        if degraded is not None and not isinstance(degraded, str):
            raise ValueError("restart history: degraded: expected a string or null")
        tracker.degraded = degraded
        return tracker


def _count(v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"restart history: {name}: expected a non-negative integer")
    return v


def _time(v: Any, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"restart history: {name}: expected a finite number")
    return float(v)


class Backoff:
    """Exponential delays ``base, 2·base, 4·base, …`` capped at ``cap``, e.g. reconnects.

    ``attempts`` counts delays handed out since the last :meth:`reset`, so a
    caller can give up, or tell someone, after a number of failures.
    """

    def __init__(self, base: float = 1.0, cap: float = 30.0, factor: float = 2.0) -> None:
        if not (0 < base <= cap) or factor < 1:
            raise ValueError(f"bad backoff: base={base} cap={cap} factor={factor}")
        self.base, self.cap, self.factor = base, cap, factor
        self.attempts = 0

    def next(self) -> float:
        """The delay before the next attempt."""
        delay = min(self.base * self.factor ** min(self.attempts, 64), self.cap)
        self.attempts += 1
        return delay

    def reset(self) -> None:
        """The thing succeeded: start again from ``base``."""
        self.attempts = 0
