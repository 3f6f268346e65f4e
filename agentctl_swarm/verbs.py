"""The wire grammar of the work channel: one verb per chat line.

Design note. Every line read from the channel is untrusted: it may come from
any peer on the relay, be 2 MiB long, hold control characters, lone
surrogates or ``../``.  :func:`parse` is the only door from chat text to a
typed value, and it either returns a verb whose every field has been checked,
returns ``None`` for ordinary chatter, or raises :class:`VerbError` (a
``ValueError``), whatever the input.  Task ids are checked strictly enough to
be used as one path component and as the last component of the git branch
``swarm/<agent>/<task-id>`` (``git check-ref-format`` accepts them); agent
names and roles are plain ASCII tokens.  :func:`format` is the inverse and
refuses what :func:`parse` would refuse, so a daemon cannot emit a line its
peers would drop.  The grammar is written down in ``docs/wire-grammar.md``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Union

MAX_LINE = 4096
"""Longest line, in characters, that :func:`parse` accepts and :func:`format` emits."""

ROLES = ("builder", "auditor", "qa", "general")
"""The daemon roles, in the order slots are laid out."""
ANY_ROLE = "any"

_TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_AGENT_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")
_STATUS = re.compile(r"[a-z-]{1,32}")
# C0/C1 controls, DEL, line/paragraph separators and lone surrogates: each can
# split a log line, fool a terminal or make a UTF-8 encoder raise later.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_UNSAFE_RUN = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]+")
_ELLIPSIS = "\u2026"


class VerbError(ValueError):
    """A line that names a verb but breaks the grammar (or a verb that cannot be sent)."""


@dataclass(frozen=True)
class Task:
    """``TASK <task-id> <role> <prompt…>``: a task announcement."""

    VERB: ClassVar[str] = "TASK"
    task_id: str
    role: str
    prompt: str


@dataclass(frozen=True)
class Claim:
    """``CLAIM <task-id> <agent-name>``: an idle daemon asks for a task."""

    VERB: ClassVar[str] = "CLAIM"
    task_id: str
    agent: str


@dataclass(frozen=True)
class Unclaim:
    """``UNCLAIM <task-id> <agent-name>``: a daemon gives a task back."""

    VERB: ClassVar[str] = "UNCLAIM"
    task_id: str
    agent: str


@dataclass(frozen=True)
class Assign:
    """``ASSIGN <task-id> <agent-name>``: the coordinator picks a claimer."""

    VERB: ClassVar[str] = "ASSIGN"
    task_id: str
    agent: str


@dataclass(frozen=True)
class Rejected:
    """``REJECTED <task-id> <agent-name>``: the coordinator turns a claimer down."""

    VERB: ClassVar[str] = "REJECTED"
    task_id: str
    agent: str


@dataclass(frozen=True)
class Status:
    """``STATUS <task-id> <agent-name> <text…>``: forwarded session output."""

    VERB: ClassVar[str] = "STATUS"
    task_id: str
    agent: str
    text: str


@dataclass(frozen=True)
class Done:
    """``DONE <task-id> <agent-name> <summary…>``: the session succeeded."""

    VERB: ClassVar[str] = "DONE"
    task_id: str
    agent: str
    summary: str


@dataclass(frozen=True)
class Fail:
    """``FAIL <task-id> <agent-name> <reason…>``: the session failed."""

    VERB: ClassVar[str] = "FAIL"
    task_id: str
    agent: str
    reason: str


@dataclass(frozen=True)
class Blocked:
    """``BLOCKED <task-id> <agent-name> <reason…>``: the session was denied something."""

    VERB: ClassVar[str] = "BLOCKED"
    task_id: str
    agent: str
    reason: str


@dataclass(frozen=True)
class Heartbeat:
    """``HEARTBEAT <agent-name> <status>``: an idle or busy daemon says it is alive."""

    VERB: ClassVar[str] = "HEARTBEAT"
    agent: str
    status: str


Verb = Union[Task, Claim, Unclaim, Assign, Rejected, Status, Done, Fail, Blocked, Heartbeat]

_PAIR_VERBS: dict[str, type] = {c.VERB: c for c in (Claim, Unclaim, Assign, Rejected)}
_TEXT_VERBS: dict[str, type] = {c.VERB: c for c in (Status, Done, Fail, Blocked)}
VERBS = frozenset(("TASK", "HEARTBEAT", *_PAIR_VERBS, *_TEXT_VERBS))


def is_valid_task_id(s: object) -> bool:
    """True if ``s`` is safe as a path component and as a git ref component."""
    if not isinstance(s, str) or not _TASK_ID.fullmatch(s):
        return False
    # The regex already rules out a leading '.' or '-', "@{", spaces and the
    # characters git forbids; these are git's remaining component rules.
    return ".." not in s and not s.endswith(".") and not s.lower().endswith(".lock")


def is_valid_agent_name(s: object) -> bool:
    """True if ``s`` is an agentchat name: 1-32 of ``[A-Za-z0-9_-]``."""
    return isinstance(s, str) and _AGENT_NAME.fullmatch(s) is not None


def is_valid_status(s: object) -> bool:
    """True if ``s`` is a heartbeat status token: 1-32 of ``[a-z-]``."""
    return isinstance(s, str) and _STATUS.fullmatch(s) is not None


def parse(line: str) -> Verb | None:
    """Parse one chat line: a verb, ``None`` for chatter, or :class:`VerbError`."""
    if not isinstance(line, str):
        raise VerbError(f"expected a str line, got {type(line).__name__}")
    verb = line.split(" ", 1)[0]
    if verb not in VERBS:
        return None
    if len(line) > MAX_LINE:
        raise VerbError(f"{verb}: line of {len(line)} characters exceeds {MAX_LINE}")
    bad = _UNSAFE.search(line)
    if bad:
        raise VerbError(f"{verb}: control character {bad.group()!r} at {bad.start()}")
    if verb == "TASK":
        return _parse_task(line)
    if verb == "HEARTBEAT":
        agent, status = _fields(line, 2, text=False)
        return Heartbeat(_agent(verb, agent), _status(verb, status))
    if verb in _PAIR_VERBS:
        task_id, agent = _fields(line, 2, text=False)
        return _PAIR_VERBS[verb](_task_id(verb, task_id), _agent(verb, agent))
    task_id, agent, text = _fields(line, 3, text=True)
    return _TEXT_VERBS[verb](_task_id(verb, task_id), _agent(verb, agent), _text(verb, text))


def _parse_task(line: str) -> Task:
    task_id, role, prompt = _fields(line, 3, text=True)
    return Task(_task_id("TASK", task_id), _role("TASK", role), _text("TASK", prompt))


def _fields(line: str, count: int, *, text: bool) -> list[str]:
    """Split the fields after the verb; with ``text`` the last one keeps its spaces."""
    verb = line.split(" ", 1)[0]
    parts = line.split(" ", count if text else -1)[1:]
    if len(parts) != count:
        raise VerbError(f"{verb}: expected {count} fields, got {len(parts)}")
    fixed = parts[:-1] if text else parts
    if any(not p for p in fixed) or (text and parts[-1][:1] == " "):
        raise VerbError(f"{verb}: fields must be separated by single spaces")
    return parts


def _task_id(verb: str, value: str) -> str:
    if not is_valid_task_id(value):
        raise VerbError(f"{verb}: invalid task id {_short(value)}")
    return value


def _agent(verb: str, value: str) -> str:
    if not is_valid_agent_name(value):
        raise VerbError(f"{verb}: invalid agent name {_short(value)}")
    return value


def _role(verb: str, value: str) -> str:
    if value != ANY_ROLE and value not in ROLES:
        raise VerbError(f"{verb}: invalid role {_short(value)} (expected any, {', '.join(ROLES)})")
    return value


def _status(verb: str, value: str) -> str:
    if not is_valid_status(value):
        raise VerbError(f"{verb}: invalid status {_short(value)}")
    return value


def _text(verb: str, value: str) -> str:
    if not value:
        raise VerbError(f"{verb}: empty text")
    return value


def _short(value: str) -> str:
    return repr(value if len(value) <= 40 else value[:40] + _ELLIPSIS)


def format(verb: Verb) -> str:  # noqa: A001 - the inverse of parse(), by design
    """Render a verb as one line; free text is cleaned and truncated, ids are checked."""
    name = getattr(type(verb), "VERB", None)
    if name not in VERBS or not isinstance(verb, _VERB_TYPES):
        raise TypeError(f"not a verb: {type(verb).__name__}")
    if isinstance(verb, Heartbeat):
        return f"HEARTBEAT {_agent(name, verb.agent)} {_status(name, verb.status)}"
    if isinstance(verb, Task):
        head = f"TASK {_task_id(name, verb.task_id)} {_role(name, verb.role)} "
        return head + _fit(name, head, verb.prompt)
    head = f"{name} {_task_id(name, verb.task_id)} {_agent(name, verb.agent)}"
    if isinstance(verb, tuple(_PAIR_VERBS.values())):
        return head
    head += " "
    return head + _fit(name, head, _free_text(verb))


format_verb = format


def _free_text(verb: Verb) -> str:
    for attr in ("text", "summary", "reason"):
        if hasattr(verb, attr):
            return getattr(verb, attr)
    raise TypeError(f"not a text verb: {type(verb).__name__}")


def clean_text(text: str) -> str:
    """Collapse control characters and line breaks to single spaces, trim leading spaces."""
    if not isinstance(text, str):
        raise VerbError(f"expected str text, got {type(text).__name__}")
    return _UNSAFE_RUN.sub(" ", text).lstrip(" ")


def _fit(verb: str, head: str, text: str) -> str:
    """Clean ``text`` and cut it so that ``head + text`` fits in :data:`MAX_LINE`."""
    cleaned = clean_text(text)
    if not cleaned.strip():
        raise VerbError(f"{verb}: empty text")
    room = MAX_LINE - len(head)
    if len(cleaned) > room:
        cleaned = cleaned[: room - 1] + _ELLIPSIS
    return cleaned


_VERB_TYPES = (Task, Claim, Unclaim, Assign, Rejected, Status, Done, Fail, Blocked, Heartbeat)
