"""Health monitor: heartbeat deadlines and resource samples, reported, never acted on.

A daemon is declared dead only after ``misses`` consecutive heartbeat intervals
pass without a heartbeat (plus half an interval of slack for a late timer), never
on one miss. Resource samples are read-only (psutil RSS, which costs one small
/proc read per daemon); they are logged and shown in ``status``. The supervisor
decides what to do about either.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

log = logging.getLogger(__name__)


@dataclass
class Vitals:
    last_beat: float
    rss_bytes: int | None = None
    cpu_seconds: float | None = None
    reported_dead: bool = False


class HealthMonitor:
    """Tracks each daemon's last heartbeat and resource use."""

    def __init__(self, interval: float, misses: int, log_path: Path | None = None) -> None:
        self.interval = interval
        self.misses = misses
        self.log_path = log_path
        self._vitals: dict[str, Vitals] = {}

    def configure(self, interval: float, misses: int) -> None:
        self.interval, self.misses = interval, misses

    @property
    def deadline(self) -> float:
        return self.interval * (self.misses + 0.5)

    def beat(self, name: str, now: float) -> None:
        vitals = self._vitals.get(name)
        if vitals is None:
            self._vitals[name] = Vitals(now)
        else:
            vitals.last_beat = now
            vitals.reported_dead = False

    def forget(self, name: str) -> None:
        self._vitals.pop(name, None)

    def age(self, name: str, now: float) -> float | None:
        vitals = self._vitals.get(name)
        return None if vitals is None else max(0.0, now - vitals.last_beat)

    def rss(self, name: str) -> int | None:
        vitals = self._vitals.get(name)
        return None if vitals is None else vitals.rss_bytes

    def overdue(self, now: float) -> list[str]:
        """Daemons that missed ``misses`` heartbeats in a row; each reported once."""
        dead = []
        for name, vitals in self._vitals.items():
            if not vitals.reported_dead and now - vitals.last_beat > self.deadline:
                vitals.reported_dead = True
                dead.append(name)
        for name in dead:
            missed = int((now - self._vitals[name].last_beat) // self.interval)
            self.record({"event": "dead", "agent": name, "missed": missed})
        return dead

    def sample(self, pids: dict[str, int]) -> None:
        """Read RSS and CPU time of each daemon (read-only) and log a summary."""
        total = 0
        for name, pid in pids.items():
            vitals = self._vitals.get(name)
            if vitals is None:
                continue
            try:
                proc = psutil.Process(pid)
                vitals.rss_bytes = proc.memory_info().rss
                times = proc.cpu_times()
                vitals.cpu_seconds = times.user + times.system
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            total += vitals.rss_bytes
        self.record({"event": "sample", "daemons": len(pids), "total_rss_mb": round(total / 2**20, 1)})

    def record(self, entry: dict[str, object]) -> None:
        """Append one JSON line to health.log; a full disk only costs the line."""
        if self.log_path is None:
            return
        entry = {"ts": round(time.time(), 3), **entry}
        try:
            with open(self.log_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry) + "\n")
        except OSError as exc:
            log.debug("health.log not written: %s", exc)
