"""Tasks: accept, announce, assign, gate promotion, requeue, persist.

A task moves queued -> announced -> assigned -> running -> done | failed |
blocked | cancelled, and back to queued when it was unclaimed, interrupted or
failed for a retriable reason. Every change is written to ``state/tasks.json``
atomically, so nothing a person posted is lost across a supervisor restart.

With ``coordinator: builtin`` the supervisor's own agentchat identity answers
CLAIMs with ASSIGN (the first valid claimer) or REJECTED; daemons trust ASSIGN
only from that identity. With ``external`` someone else on the channel assigns,
and this module only gates promotion and keeps the books.

The promotion gate approves a daemon's request only while fewer than
``max-active`` sessions run and neither the token budget nor the quota pause
stops promotions. Denied tasks wait in a FIFO that is announced first when
capacity frees up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import time
from collections import deque
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from . import verbs
from .budget import Budget
from .state import read_json, write_json_atomic
from .system.journal import log_fields

if TYPE_CHECKING:
    from .config import SwarmConfig
    from .supervisor import Slot, Supervisor

log = logging.getLogger("agentctl_swarm.coordinator")

OPEN = ("queued", "announced", "assigned", "running")
FINAL = ("done", "failed", "blocked", "cancelled")
MAX_ATTEMPTS = 3
ANNOUNCE_TIMEOUT_S = 10.0
KEEP_FINISHED = 1000
ROLES = ("builder", "auditor", "qa", "general", "any")


class TaskError(Exception):
    """A task request that cannot be accepted (one readable line)."""


@dataclass
class TaskRecord:
    id: str
    role: str
    prompt: str
    state: str = "queued"
    agent: str | None = None
    tokens: int = 0
    cost_usd: float = 0.0
    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    attempts: int = 0
    reason: str = ""
    summary: str = ""
    source: str = "cli"
    announced_at: float | None = None
    cancel_requested: bool = False

    def public(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("announced_at", "cancel_requested")}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TaskRecord | None":
        names = {f.name for f in fields(cls)}
        try:
            record = cls(**{k: v for k, v in data.items() if k in names})
        except TypeError:
            return None
        ok = verbs.is_valid_task_id(record.id) and record.role in ROLES and \
            record.state in OPEN + FINAL and isinstance(record.prompt, str)
        return record if ok else None


class Coordinator:
    """The supervisor's task book and its voice on the work channel."""

    def __init__(self, supervisor: "Supervisor") -> None:
        self.sup = supervisor
        self.tasks: dict[str, TaskRecord] = {}
        self.fifo: deque[str] = deque()
        self.budget = Budget(supervisor.paths.state_file("budget"), supervisor.config.token_budget)
        self.client: Any = None
        self.agent_id = ""
        self._probe_timer: asyncio.TimerHandle | None = None
        self._probing: str | None = None
        self.unsaved = False  # the last save failed (a full disk): retried every loop turn

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        for problem in (self._load(), self.budget.load()):
            if problem:
                log.warning("%s", problem, extra=log_fields(event="state"))
        self.budget.limit = self.sup.config.token_budget
        await self._connect()
        if self.budget.quota_paused:
            self._schedule_probe()

    async def _connect(self) -> None:
        from .agentchat.client import AgentChatClient
        from .agentchat.identity import Identity, IdentityError
        path = self.sup.paths.state_dir / "coordinator-identity.json"
        try:
            identity = Identity.load(path)
        except (IdentityError, OSError):
            identity = Identity.generate("swarm-coordinator")
            identity.save(path)
        self.agent_id = identity.agent_id
        cfg = self.sup.config
        self.client = AgentChatClient(self.sup.relay_url, identity, list(cfg.agentchat_channels),
                                      on_message=self._on_chat, on_event=self._on_link_event,
                                      send_interval=1.0 / cfg.agentchat_rate_limit
                                      if cfg.agentchat_rate_limit else 0.0,
                                      deliver_replay=True,  # TASKs posted while we were away
                                      # daemons' liveness comes over IPC (health monitor): the
                                      # relay need not send us N heartbeats per interval
                                      ignore_heartbeats=True)
        asyncio.get_running_loop().create_task(self.client.run())
        await self.client.wait_connected(10.0)

    async def stop(self) -> None:
        if self._probe_timer is not None:
            self._probe_timer.cancel()
        self._save()
        if self.client is not None:
            await self.client.close()

    def _on_link_event(self, event: str, detail: dict[str, Any]) -> None:
        if event == "connected":
            self.pump()
        elif event in ("send_refused", "reconnect_failed", "error"):
            log.warning("coordinator link: %s %s", event, detail, extra=log_fields(event=event))

    @property
    def work_channel(self) -> str:
        return self.sup.config.work_channel

    def say(self, verb: Any) -> None:
        if self.client is not None:
            self.client.send(self.work_channel, verbs.format(verb))

    # ------------------------------------------------------------ persistence
    def _load(self) -> str | None:
        saved, problem = read_json(self.sup.paths.state_file("tasks"), {})
        items = saved.get("tasks", []) if isinstance(saved, dict) else []
        for item in items if isinstance(items, list) else []:
            record = TaskRecord.from_dict(item) if isinstance(item, dict) else None
            if record is not None:
                self.tasks[record.id] = record
        for record in self.tasks.values():
            if record.state in ("announced", "assigned", "running"):
                record.reason = record.reason or "supervisor restarted"
                self._requeue(record, "supervisor restarted", count_attempt=record.state == "running")
        return problem

    def _save(self) -> str | None:
        """Persist the budget (if a save of it failed) and the tasks; None, or why not.

        A failure never stops the swarm: the state stays in memory, ``unsaved`` is set
        and ``save_pending`` retries on every turn of the supervisor's loop, so state
        reaches the disk within a tick of space coming back.
        """
        if self.budget.dirty and not self.budget.save():
            self.unsaved = True
            return "the budget could not be saved"
        finished = sorted((t for t in self.tasks.values() if t.state in FINAL),
                          key=lambda t: t.finished or 0)
        old = finished[:max(0, len(finished) - KEEP_FINISHED)]
        if old and self._archive(old):
            for record in old:
                del self.tasks[record.id]
        try:
            write_json_atomic(self.sup.paths.state_file("tasks"),
                              {"version": 1, "tasks": [t.public() for t in self.tasks.values()]})
        except Exception as exc:  # noqa: BLE001 - a full disk must not stop the swarm
            if not self.unsaved:
                log.error("tasks not saved: %s", exc, extra=log_fields(event="state"))
            self.unsaved = True
            return str(exc)
        if self.unsaved:
            log.info("tasks saved again", extra=log_fields(event="state"))
        self.unsaved = False
        return None

    def save_pending(self) -> None:
        """Retry a failed save (called every turn of the supervisor's loop)."""
        if self.unsaved or self.budget.dirty:
            self._save()

    # ------------------------------------------------------------ commands
    def add(self, prompt: str, role: str = "any", task_id: str | None = None,
            source: str = "cli") -> TaskRecord:
        prompt = " ".join(str(prompt).split())
        if not prompt:
            raise TaskError("the prompt is empty")
        if role not in ROLES:
            raise TaskError(f"unknown role {role!r}: expected one of {', '.join(ROLES)}")
        task_id = task_id or f"t-{secrets.token_hex(4)}"
        if not verbs.is_valid_task_id(task_id):
            raise TaskError(f"invalid task id {task_id[:80]!r}: 1-64 of A-Z a-z 0-9 . _ -")
        if task_id in self.tasks:
            raise TaskError(f"task {task_id} already exists")
        try:
            verbs.format(verbs.Task(task_id, role, prompt))
        except verbs.VerbError as exc:
            raise TaskError(f"prompt cannot be sent: {exc}") from None
        record = TaskRecord(task_id, role, prompt, created=time.time(), source=source)
        self.tasks[task_id] = record
        problem = self._save()
        if problem is not None:  # never acknowledge a task that a crash could lose
            del self.tasks[task_id]
            raise TaskError(f"task {task_id} not added: state cannot be saved ({problem}); "
                            "try again when there is space")
        log.info("task %s added (%s)", task_id, role, extra=log_fields(task=task_id, event="task-add"))
        self.pump()
        return record

    def cancel(self, task_id: str) -> TaskRecord:
        record = self.tasks.get(task_id)
        if record is None:
            raise TaskError(f"no task {task_id[:80]!r}")
        if record.state in FINAL:
            raise TaskError(f"task {task_id} is already {record.state}")
        if record.state in ("assigned", "running") and record.agent in self.sup.slots:
            record.cancel_requested = True
            slot = self.sup.slots[record.agent]
            if slot.channel is not None:
                slot.channel.send({"t": "cancel", "task_id": task_id,
                                   "grace": self.sup.config.shutdown_grace})
        if record.state in ("queued", "announced") or not record.cancel_requested:
            self._finish(record, "cancelled", "cancelled by operator")
        self._save()
        return record

    def _archive(self, records: list[TaskRecord]) -> bool:
        """Move finished tasks out of tasks.json into an append-only archive (nothing is lost).

        All or nothing: a short write (a full disk) is cut back to the old end of the
        file, so a record is either whole in the archive or still in tasks.json. A torn
        last line left by a crash is ended first, so it never glues onto the next record.
        """
        path = self.sup.paths.state_file("tasks-archive").with_suffix(".jsonl")
        data = "".join(json.dumps(r.public()) + "\n" for r in records).encode()
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            return self._archive_failed(exc)
        end = None
        try:
            end = os.fstat(fd).st_size
            if end and os.pread(fd, 1, end - 1) != b"\n":
                data = b"\n" + data
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as exc:
            if end is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, end)
            return self._archive_failed(exc)
        finally:
            os.close(fd)
        return True

    @staticmethod
    def _archive_failed(exc: OSError) -> bool:
        log.error("task archive not written (%s); finished tasks stay in tasks.json", exc,
                  extra=log_fields(event="state"))
        return False

    def archived(self) -> list[dict[str, Any]]:
        path = self.sup.paths.state_file("tasks-archive").with_suffix(".jsonl")
        out = []
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    try:
                        item = json.loads(line)
                    except ValueError:
                        continue  # a torn last line after a crash
                    if isinstance(item, dict) and TaskRecord.from_dict(item) is not None:
                        out.append(item)
        except FileNotFoundError:
            pass
        return out

    def listing(self, include_archived: bool = False) -> list[dict[str, Any]]:
        live = [t.public() for t in sorted(self.tasks.values(), key=lambda t: t.created)]
        if not include_archived:
            return live
        # A crash between the archive append and the tasks.json save archives a task that
        # tasks.json still holds (it is archived again later): each task is listed once.
        archived = {t["id"]: t for t in self.archived() if t["id"] not in self.tasks}
        return list(archived.values()) + live

    # ------------------------------------------------------------ the channel
    def _on_chat(self, frame: dict[str, Any]) -> None:
        content, sender = frame.get("content"), str(frame.get("from", ""))
        if not isinstance(content, str) or frame.get("to") != self.work_channel:
            return
        if content.startswith("HEARTBEAT ") or sender == self.agent_id:
            return
        try:
            verb = verbs.parse(content)
        except verbs.VerbError as exc:
            log.info("dropped malformed line from %s: %s", sender[:40], exc, extra=log_fields(event="bad-line"))
            return
        if frame.get("replay") and not isinstance(verb, verbs.Task):
            return  # history: only a task we have not seen is news
        handler = getattr(self, f"_on_{type(verb).__name__.lower()}", None)
        if handler is not None:
            handler(verb, sender)

    def _on_task(self, verb: verbs.Task, sender: str) -> None:
        if verb.task_id in self.tasks:
            return
        record = TaskRecord(verb.task_id, verb.role, verb.prompt, state="announced",
                            created=time.time(), source=f"channel {sender[:40]}",
                            announced_at=time.monotonic())
        self.tasks[verb.task_id] = record
        self._save()
        log.info("task %s posted on the channel by %s", verb.task_id, sender[:40],
                 extra=log_fields(task=verb.task_id, event="task-add"))

    def _on_claim(self, verb: verbs.Claim, sender: str) -> None:
        if self.sup.config.coordinator != "builtin":
            return
        record = self.tasks.get(verb.task_id)
        slot = self.sup.slots.get(verb.agent)
        genuine = slot is not None and slot.agent_id == sender
        if record is None or record.state != "announced" or not genuine:
            if genuine or record is not None:
                self.say(verbs.Rejected(verb.task_id, verb.agent))
            return
        record.state, record.agent = "assigned", verb.agent
        record.announced_at = time.monotonic()  # from now on: when it was assigned
        self._save()
        self.say(verbs.Assign(verb.task_id, verb.agent))
        log.info("task %s assigned to %s", verb.task_id, verb.agent,
                 extra=log_fields(agent=verb.agent, task=verb.task_id, event="assign"))

    def _on_unclaim(self, verb: verbs.Unclaim, sender: str) -> None:
        record = self.tasks.get(verb.task_id)
        slot = self.sup.slots.get(verb.agent)
        if record and record.agent == verb.agent and record.state == "assigned" and \
                slot is not None and slot.agent_id == sender:
            self._requeue(record, "unclaimed", count_attempt=False, front=True)

    def _on_done(self, verb: Any, sender: str) -> None:
        log.info("%s reports %s DONE: %s", verb.agent, verb.task_id, verb.summary[:200],
                 extra=log_fields(agent=verb.agent, task=verb.task_id, event="done"))

    def _on_fail(self, verb: Any, sender: str) -> None:
        log.info("%s reports %s FAIL: %s", verb.agent, verb.task_id, verb.reason[:200],
                 extra=log_fields(agent=verb.agent, task=verb.task_id, event="fail"))

    _on_blocked = _on_fail

    # ------------------------------------------------------------ announcing
    def pump(self) -> None:
        """Announce queued tasks (the denied FIFO first) while a daemon can take them.

        A task is announced only when a session may start (max-active, budget,
        quota) and an idle daemon of its role is there to claim it; daemons that
        are busy when a TASK passes ignore it, so announcing earlier loses it.
        """
        if self.sup.config.coordinator != "builtin" or self.client is None or self.sup.stopping:
            return
        self._expire_announcements()
        announced = False
        skipped: list[TaskRecord] = []
        while self.budget.paused_reason() is None and self._capacity() > 0:
            record = self._next_queued(skipped)
            if record is None:
                break
            if not self._idle_daemon_for(record.role):
                skipped.append(record)
                continue
            record.state, record.agent = "announced", None
            record.announced_at = time.monotonic()
            self.say(verbs.Task(record.id, record.role, record.prompt))
            announced = True
            log.info("task %s announced", record.id, extra=log_fields(task=record.id, event="announce"))
        for record in skipped:
            if record.id not in self.fifo:
                self.fifo.appendleft(record.id)
        if announced:
            self._save()

    def _capacity(self) -> int:
        busy = sum(1 for t in self.tasks.values() if t.state in ("announced", "assigned", "running"))
        return self.sup.config.max_active - busy

    def _idle_daemon_for(self, role: str) -> bool:
        """Is there an idle daemon of ``role`` not already expected to claim an announced task?"""
        idle = [s for s in self.sup.slots.values()
                if s.status.value == "idle" and s.connected and not s.task_id and not s.retiring]
        pending = [t for t in self.tasks.values() if t.state == "announced"]
        if len(idle) <= len(pending):
            return False
        if role == "any":
            return True
        mine = sum(1 for s in idle if s.role == role)
        return mine > sum(1 for t in pending if t.role == role)

    def _next_queued(self, skipped: list[TaskRecord]) -> TaskRecord | None:
        while self.fifo:
            record = self.tasks.get(self.fifo.popleft())
            if record is not None and record.state == "queued" and record not in skipped:
                return record
        queued = [t for t in self.tasks.values() if t.state == "queued" and t not in skipped]
        return min(queued, key=lambda t: t.created) if queued else None

    def _expire_announcements(self) -> None:
        """A task nobody claimed, or whose assignee never asked to run it, is queued again."""
        now = time.monotonic()
        for record in self.tasks.values():
            if record.state == "assigned" and now - (record.announced_at or now) > ANNOUNCE_TIMEOUT_S:
                log.info("task %s: %s never started it; queued again", record.id, record.agent,
                         extra=log_fields(task=record.id, event="assign-expired"))
                self._requeue(record, "assignee did not start it", count_attempt=False, front=True)
                continue
            if record.state == "announced" and now - (record.announced_at or now) > ANNOUNCE_TIMEOUT_S:
                record.state = "queued"
                log.info("task %s was not claimed in %.0fs; queued again", record.id,
                         ANNOUNCE_TIMEOUT_S, extra=log_fields(task=record.id, event="announce-expired"))

    # ------------------------------------------------------------ the promotion gate
    def promote_requested(self, slot: "Slot", task_id: str) -> None:
        reason = self._refusal(slot, task_id)
        if reason is None:
            record = self.tasks.get(task_id)
            slot.task_id, slot.status = task_id, type(slot.status)("promoting")
            slot.channel.send({"t": "approve", "task_id": task_id,  # type: ignore[union-attr]
                               "prompt": record.prompt if record else ""})
            log.info("promotion of %s for %s approved", slot.name, task_id, extra=slot.fields(event="promote"))
            return
        slot.channel.send({"t": "deny", "task_id": task_id, "reason": reason})  # type: ignore[union-attr]
        log.info("promotion of %s for %s denied: %s", slot.name, task_id, reason,
                 extra=slot.fields(event="promote-denied"))
        record = self.tasks.get(task_id)
        if record is not None and record.agent == slot.name and record.state == "assigned":
            self._requeue(record, reason, count_attempt=False, front=True)

    def _refusal(self, slot: "Slot", task_id: str) -> str | None:
        record = self.tasks.get(task_id)
        if self.sup.config.coordinator == "builtin" and \
                (record is None or record.agent != slot.name or record.state != "assigned"):
            return "not assigned to you"
        if record is not None and record.cancel_requested:
            return "cancelled"
        paused = self.budget.paused_reason()
        if paused:
            return paused
        active = sum(1 for s in self.sup.slots.values() if s.task_id)
        if active >= self.sup.config.max_active:
            return f"max-active {self.sup.config.max_active} reached"
        return None

    def session_started(self, slot: "Slot", task_id: str, pid: int) -> None:
        if task_id != slot.task_id:
            log.warning("%s reports a session for %s it was not approved for", slot.name, task_id[:64],
                        extra=slot.fields(event="ipc"))
            return
        slot.session_pid, slot.task_started = pid, time.monotonic()
        record = self.tasks.get(task_id)
        if record is not None:
            record.state, record.agent, record.started = "running", slot.name, time.time()
            self._save()

    def session_ended(self, slot: "Slot", msg: dict[str, Any]) -> None:
        task_id = msg["task_id"]
        if task_id != slot.task_id:
            log.warning("%s reports the end of %s it was not running", slot.name, task_id[:64],
                        extra=slot.fields(event="ipc"))
            return
        tokens, cost = max(0, int(msg["tokens"])), max(0.0, float(msg["cost_usd"]))
        self.budget.add(tokens, cost)
        slot.task_id = slot.session_pid = slot.task_started = None
        if task_id == self._probing:
            self._probe_done(msg)
            return
        record = self.tasks.get(task_id)
        if record is not None:
            record.tokens += tokens
            record.cost_usd = round(record.cost_usd + cost, 6)
            self._settle(record, msg)
        if msg.get("quota"):
            self.pause_for_quota(slot.name)
        elif self.budget.exhausted:
            log.warning("token budget spent (%s/%s): promotions paused", self.budget.used,
                        self.budget.limit, extra=log_fields(event="budget"))
        self.pump()

    def _settle(self, record: TaskRecord, msg: dict[str, Any]) -> None:
        outcome, reason = msg["outcome"], msg["reason"]
        record.summary = str(msg.get("summary", ""))[:1000]
        if record.cancel_requested:
            self._finish(record, "cancelled", "cancelled by operator")
        elif outcome == "done":
            self._finish(record, "done", "")
        elif outcome == "blocked":
            self._finish(record, "blocked", reason)
        elif msg.get("quota"):
            self._requeue(record, "quota", count_attempt=False, front=True)
        elif reason == "cancelled":  # stopped by a shutdown, not by the operator: run it again
            self._requeue(record, "interrupted by shutdown", count_attempt=False, front=True)
        elif msg.get("retriable") and record.attempts + 1 < MAX_ATTEMPTS:
            self._requeue(record, reason, count_attempt=True)
        else:
            record.attempts += 1
            self._finish(record, "failed", reason)
        log.info("task %s %s %s", record.id, record.state, record.reason,
                 extra=log_fields(agent=record.agent, task=record.id, event=f"task-{record.state}"))

    def agent_gone(self, agent: str, reason: str) -> None:
        """A daemon died: whatever it was assigned or running goes back to the queue."""
        for record in list(self.tasks.values()):
            if record.agent == agent and record.state in ("assigned", "running"):
                self.task_interrupted(record.id, agent, reason)

    def task_interrupted(self, task_id: str, agent: str, reason: str) -> None:
        record = self.tasks.get(task_id)
        if record is None or record.agent != agent or record.state not in ("assigned", "running"):
            return
        if record.cancel_requested:
            self._finish(record, "cancelled", "cancelled by operator")
        elif record.attempts + 1 < MAX_ATTEMPTS:
            self._requeue(record, f"interrupted: {reason}", count_attempt=True)
        else:
            record.attempts += 1
            self._finish(record, "failed", f"interrupted: {reason}")
        self._save()
        self.pump()

    def _requeue(self, record: TaskRecord, reason: str, *, count_attempt: bool, front: bool = False) -> None:
        record.state, record.agent, record.reason = "queued", None, reason
        record.started = None
        if count_attempt:
            record.attempts += 1
        if front and record.id not in self.fifo:
            self.fifo.append(record.id)
        self._save()

    def _finish(self, record: TaskRecord, state: str, reason: str) -> None:
        record.state, record.reason, record.finished = state, reason, time.time()
        self._save()

    # ------------------------------------------------------------ quota
    def pause_for_quota(self, agent: str) -> None:
        if not self.budget.quota_paused:
            log.error("quota exhausted (reported by %s): all promotions paused", agent,
                      extra=log_fields(agent=agent, event="quota"))
        self.budget.quota_paused, self.budget.quota_since = True, time.time()
        self.budget.save()
        self._schedule_probe()

    def _schedule_probe(self) -> None:
        if self._probe_timer is not None:
            self._probe_timer.cancel()
        delay = self.sup.config.quota_probe_interval
        self._probe_timer = asyncio.get_running_loop().call_later(delay, self._probe)

    def _probe(self) -> None:
        """Run one small session on an idle daemon to see if the quota is back."""
        idle = [s for s in self.sup.slots.values() if s.status.value == "idle" and s.channel and not s.task_id]
        if not idle or not self.budget.quota_paused:
            self._schedule_probe() if self.budget.quota_paused else None
            return
        slot = idle[0]
        self._probing = f"quota-probe-{secrets.token_hex(3)}"
        slot.task_id = self._probing
        slot.channel.send({"t": "approve", "task_id": self._probing, "probe": True,  # type: ignore[union-attr]
                           "prompt": self.sup.config.quota_probe_prompt})
        log.info("probing quota with %s", slot.name, extra=slot.fields(event="quota-probe"))

    def _probe_done(self, msg: dict[str, Any]) -> None:
        self._probing = None
        if msg["outcome"] == "done" and not msg.get("quota"):
            self.budget.quota_paused = False
            self.budget.save()
            log.info("quota restored: promotions resumed", extra=log_fields(event="quota-restored"))
            self.pump()
        else:
            log.info("quota still exhausted (%s)", msg["reason"], extra=log_fields(event="quota-probe"))
            self._schedule_probe()

    # ------------------------------------------------------------ views
    def config_changed(self, old: "SwarmConfig", new: "SwarmConfig") -> None:
        self.budget.limit = new.token_budget
        self.budget.save()
        self.pump()

    def paused_reason(self) -> str | None:
        return self.budget.paused_reason()

    def budget_line(self) -> str:
        return self.budget.line()

    def budget_dict(self) -> dict[str, Any]:
        return self.budget.as_dict()
