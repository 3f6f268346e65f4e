"""The swarm-wide token budget and the quota pause; persisted in state/budget.json."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .errors import StateError
from .state import read_json, write_json_atomic
from .system.journal import log_fields

log = logging.getLogger("agentctl_swarm.budget")


class Budget:
    """Tokens used across the swarm, against ``token-budget`` (None = unlimited)."""

    def __init__(self, path: Path, limit: int | None) -> None:
        self.path = path
        self.limit = limit
        self.used = 0
        self.cost_usd = 0.0
        self.quota_paused = False
        self.quota_since: float | None = None
        self.dirty = False  # the last save failed; the coordinator retries it

    def load(self) -> str | None:
        """Read the saved totals; returns a problem line when the file was corrupt."""
        saved, problem = read_json(self.path, {})
        if isinstance(saved, dict):
            self.used = _nonneg_int(saved.get("used"))
            cost = saved.get("cost_usd")
            self.cost_usd = float(cost) if isinstance(cost, (int, float)) and cost >= 0 else 0.0
            self.quota_paused = saved.get("quota_paused") is True
        return problem

    def save(self) -> bool:
        """Persist the totals; a full disk costs the write (retried later), never the swarm."""
        try:
            write_json_atomic(self.path, {"used": self.used, "cost_usd": round(self.cost_usd, 6),
                                          "limit": self.limit, "quota_paused": self.quota_paused})
        except StateError as exc:
            if not self.dirty:
                log.error("budget not saved: %s", exc, extra=log_fields(event="state"))
            self.dirty = True
            return False
        self.dirty = False
        return True

    def add(self, tokens: int, cost_usd: float) -> None:
        self.used += max(0, tokens)
        self.cost_usd += max(0.0, cost_usd)
        self.save()

    @property
    def exhausted(self) -> bool:
        return self.limit is not None and self.used >= self.limit

    def paused_reason(self) -> str | None:
        if self.quota_paused:
            return "quota exhausted: promotions paused until a probe succeeds"
        if self.exhausted:
            return f"token budget spent ({self.used}/{self.limit}): raise token-budget and reload"
        return None

    def line(self) -> str:
        if self.limit is None:
            return f"{self.used} tokens used"
        return f"budget {min(100, round(100 * self.used / max(1, self.limit)))}% used"

    def as_dict(self) -> dict[str, Any]:
        return {"used": self.used, "limit": self.limit, "cost_usd": round(self.cost_usd, 4),
                "quota_paused": self.quota_paused}


def _nonneg_int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
