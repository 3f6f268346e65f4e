"""Logging for the supervisor: JSON-lines files, journald or stderr, and `logs`.

Design note
-----------
Every record may carry ``agent``, ``role``, ``task`` and ``event`` (pass
``extra=log_fields(...)``).  They become:

* keys of a JSON object per line in ``logs/supervisor.log``, and, for records
  with an agent, also in ``logs/agents/<agent>.log``;
* journal fields ``AGENT_NAME``, ``AGENT_ROLE``, ``TASK_ID``, ``EVENT`` under
  systemd, so ``journalctl --user -u agentctl-swarm AGENT_NAME=x`` selects one
  agent; outside systemd a short human line goes to stderr instead.

Files are written with ``O_APPEND`` and one ``write(2)`` per line, so lines
from several processes never interleave.  A swarm may have 1000 agents, so the
per-agent files are kept open in an LRU of at most 64 descriptors.

A full disk must not crash the supervisor or silence the journal: a failed
write is reported as one rate-limited line on stderr (instead of logging's
traceback per record) and the other handlers carry on.

Forked children inherit these handlers and their descriptors.  A child that
closes descriptors (the spawner does) must call :func:`detach_logging` before
logging again, or its lines could land in whatever socket reuses the numbers.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

SYSLOG_IDENTIFIER = "agentctl-swarm"
_FIELDS = ("agent", "role", "task", "event")
_JOURNAL_FIELDS = {"agent": "AGENT_NAME", "role": "AGENT_ROLE", "task": "TASK_ID", "event": "EVENT"}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_JOURNAL_KEY = re.compile(r"^[A-Z0-9][A-Z0-9_]{0,63}$")
_ERROR_INTERVAL_S = 60.0
_OURS = "_agentctl_swarm_handler"


def log_fields(
    agent: str | None = None,
    role: str | None = None,
    task: str | None = None,
    event: str | None = None,
    **more: Any,
) -> dict[str, Any]:
    """The ``extra=`` mapping for a record about an agent/task; None values left out.

    ``more`` travels as one ``fields`` attribute, so its keys can never clash
    with LogRecord's own attributes (``name``, ``msg``, ``process`` ...).
    """
    extra: dict[str, Any] = {k: v for k, v in zip(_FIELDS, (agent, role, task, event)) if v is not None}
    extras = {k: v for k, v in more.items() if v is not None}
    if extras:
        extra["fields"] = extras
    return extra


def _record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """agent/role/task/event and the extra ``fields`` carried by ``record``."""
    out = {k: getattr(record, k) for k in _FIELDS if getattr(record, k, None) is not None}
    more = getattr(record, "fields", None)
    if isinstance(more, dict):
        out.update({k: v for k, v in more.items() if k not in out})
    return out


# --------------------------------------------------------------------------
# Formatters


_JSON_LINE = "_agentctl_swarm_json"  # a record's JSON line, made once for every file handler


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, the agent fields, exc.

    The line is kept on the record, so that the supervisor's file and the agent's
    file (two handlers) format it once: a daemon start logs two records, and logging
    was ~10 % of the supervisor's CPU in a start of 300 daemons, a third of it
    formatting (py-spy, bench/profile_start.py)."""

    def format(self, record: logging.LogRecord) -> str:
        line = record.__dict__.get(_JSON_LINE)
        if line is None:
            line = record.__dict__[_JSON_LINE] = self._format(record)
        return line

    def _format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, timezone.utc)
        entry: dict[str, Any] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _record_fields(record).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class HumanFormatter(logging.Formatter):
    """``HH:MM:SS level [agent] message`` for a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        agent = getattr(record, "agent", None)
        when = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{when} {record.levelname.lower()} {f'[{agent}] ' if agent else ''}{record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


# --------------------------------------------------------------------------
# Handlers


class _QuietErrors:
    """handleError as one line on stderr at most once a minute, not a traceback."""

    _last_error = 0.0
    _suppressed = 0

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        exc = sys.exc_info()[1]
        now = time.monotonic()
        if now - self._last_error < _ERROR_INTERVAL_S:
            self._suppressed += 1
            return
        more = f" ({self._suppressed} more suppressed)" if self._suppressed else ""
        self._last_error, self._suppressed = now, 0
        try:
            sys.stderr.write(f"agentctl-swarm: {self.describe()} failed: {exc}{more}\n")
        except Exception:  # noqa: BLE001 - stderr itself may be gone; nothing left to tell
            pass

    def describe(self) -> str:
        return "logging"


def _open_append(path: Path) -> int:
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
    try:
        return os.open(path, flags, 0o640)
    except FileNotFoundError:  # the directory first (once, not on every open)
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, flags, 0o640)


def _write_line(fd: int, line: str) -> None:
    os.write(fd, (line + "\n").encode("utf-8", "replace"))


MAX_LOG_BYTES = 64 * 2**20  # per file; session output is logged line by line
LOG_BACKUPS = 2


def _rotated(path: Path, fd: int) -> int:
    """Keep a log file under MAX_LOG_BYTES: past it, shift path -> .1 -> .2 and reopen."""
    if os.fstat(fd).st_size < MAX_LOG_BYTES:
        return fd
    os.close(fd)
    for i in range(LOG_BACKUPS, 0, -1):
        source = path if i == 1 else path.with_name(f"{path.name}.{i - 1}")
        try:
            os.replace(source, path.with_name(f"{path.name}.{i}"))
        except FileNotFoundError:
            pass
    return _open_append(path)


class JsonFileHandler(_QuietErrors, logging.Handler):
    """All records, as JSON lines, to one file opened O_APPEND."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self._fd: int | None = None
        self.setFormatter(JsonFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if self._fd is None:
                self._fd = _open_append(self.path)
            self._fd = _rotated(self.path, self._fd)
            _write_line(self._fd, self.format(record))
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)

    def describe(self) -> str:
        return f"writing {self.path}"

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        super().close()

    def forget(self) -> None:
        """Drop the descriptor without closing it (it may belong to someone else now)."""
        self._fd = None


class AgentFilesHandler(_QuietErrors, logging.Handler):
    """Records that carry an agent, to ``<dir>/<agent>.log``; at most ``max_open`` fds."""

    def __init__(self, directory: Path, max_open: int = 256) -> None:
        super().__init__()
        self.directory = directory
        self.max_open = max_open
        self._fds: OrderedDict[str, int] = OrderedDict()
        self.setFormatter(JsonFormatter())

    def _fd(self, agent: str) -> int:
        fd = self._fds.pop(agent, None)
        if fd is None:
            fd = _open_append(self.directory / f"{agent}.log")
            while len(self._fds) >= self.max_open:
                os.close(self._fds.popitem(last=False)[1])
        fd = _rotated(self.directory / f"{agent}.log", fd)
        self._fds[agent] = fd
        return fd

    def emit(self, record: logging.LogRecord) -> None:
        agent = getattr(record, "agent", None)
        if not agent:
            return
        try:
            if not _SAFE_NAME.match(agent) or agent.startswith("."):
                raise ValueError(f"agent name {agent!r} is not safe as a file name")
            _write_line(self._fd(agent), self.format(record))
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)

    def describe(self) -> str:
        return f"writing agent logs in {self.directory}"

    def open_count(self) -> int:
        return len(self._fds)

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])
        super().close()

    def forget(self) -> None:
        self._fds.clear()


class StderrHandler(_QuietErrors, logging.StreamHandler):  # type: ignore[type-arg]
    """Human lines to stderr (whatever sys.stderr is when logging is set up)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream or sys.stderr)
        self.setFormatter(HumanFormatter())


def _journal_handler_class() -> type[logging.Handler] | None:
    """Our JournalHandler subclass, or None when systemd-python is not installed."""
    try:
        from systemd.journal import JournalHandler
    except ImportError:
        return None

    class SwarmJournalHandler(_QuietErrors, JournalHandler):  # type: ignore[misc,valid-type]
        """JournalHandler that maps agent/role/task/event to upper-case journal fields.

        JournalHandler sends every attribute of the record as a field and
        journald drops lower-case names, so the fields are added to a copy.
        """

        def emit(self, record: logging.LogRecord) -> None:
            copy = logging.makeLogRecord({k: v for k, v in record.__dict__.items() if k != _JSON_LINE})
            for key, value in _record_fields(record).items():
                name = _JOURNAL_FIELDS.get(key, key.upper())
                if _JOURNAL_KEY.match(name):
                    setattr(copy, name, str(value))
            super().emit(copy)

        def describe(self) -> str:
            return "sending to the journal"

    return SwarmJournalHandler


def under_systemd() -> bool:
    """Whether systemd started us (a unit's process, or its stdout is the journal)."""
    return bool(os.environ.get("INVOCATION_ID") or os.environ.get("JOURNAL_STREAM"))


# --------------------------------------------------------------------------
# Setup


def setup_logging(
    *,
    log_dir: Path,
    level: int = logging.INFO,
    journal: bool | None = None,
    stderr: bool = True,
    max_open_agent_files: int = 256,
) -> None:
    """Install the swarm's handlers on the root logger, replacing earlier ones.

    ``journal=None`` means: the journal when under systemd and systemd-python is
    installed.  ``stderr`` applies only when the journal is not used (under
    systemd, stderr already goes to the journal; writing both would double it).
    """
    detach_logging(close=True)
    handlers: list[logging.Handler] = [
        JsonFileHandler(Path(log_dir) / "supervisor.log"),
        AgentFilesHandler(Path(log_dir) / "agents", max_open_agent_files),
    ]
    journal_cls = _journal_handler_class()
    if journal is None:
        journal = under_systemd() and journal_cls is not None
    if journal:
        if journal_cls is None:
            raise RuntimeError("journal logging needs systemd-python (python3-systemd)")
        handlers.append(journal_cls(SYSLOG_IDENTIFIER=SYSLOG_IDENTIFIER))
    elif stderr:
        handlers.append(StderrHandler())
    root = logging.getLogger()
    for handler in handlers:
        setattr(handler, _OURS, True)
        root.addHandler(handler)
    root.setLevel(level)


def detach_logging(*, close: bool = False) -> None:
    """Remove the handlers setup_logging installed.

    In a forked child whose descriptors were closed, pass ``close=False``: the
    numbers may already belong to new sockets, so they must not be closed again.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(handler)
        if close:
            handler.close()
        elif hasattr(handler, "forget"):
            handler.forget()


# --------------------------------------------------------------------------
# Reading: `agentctl swarm logs [AGENT] [-f]`


def current_unit(pid: int | str = "self") -> tuple[str, bool] | None:
    """(unit name, is a user unit) that ``pid`` runs in under systemd, else None.

    Read from the process's systemd cgroup path, e.g.
    ``/user.slice/user-1000.slice/user@1000.service/app.slice/agentctl-swarm.service/supervisor``;
    the supervisor reports it in ``status`` so that ``logs`` knows what to ask
    journalctl for.
    """
    if pid == "self" and not under_systemd():
        return None
    from agentctl_swarm.system.proc import UNIFIED, process_cgroup

    groups = process_cgroup(pid)
    parts = groups.get("name=systemd", groups.get(UNIFIED, "")).split("/")
    for index in range(len(parts) - 1, -1, -1):
        if parts[index].endswith(".service"):
            user = any(p.startswith("user@") and p.endswith(".service") for p in parts[:index])
            return parts[index], user
    return None


def journal_argv(unit: str, agent: str | None, follow: bool, *, user_unit: bool = True) -> list[str]:
    """journalctl for one unit (and agent).

    ``--user-unit`` matches ``_SYSTEMD_USER_UNIT=`` of the invoking uid in every
    journal it may read, so it works for a user and for root, with split
    per-user journals and with everything in the system journal.
    """
    argv = ["journalctl", "--user-unit" if user_unit else "--unit", unit, "-o", "short"]
    if agent:
        argv.append(f"AGENT_NAME={agent}")
    if follow:
        argv.append("--follow")
    return argv


def human_line(line: str) -> str:
    """A JSON log line as ``YYYY-MM-DD HH:MM:SS level [agent] msg``; others unchanged."""
    try:
        entry = json.loads(line)
        when = datetime.fromisoformat(entry["ts"].replace("Z", "+00:00")).astimezone()
    except (ValueError, KeyError, TypeError, AttributeError):
        return line.rstrip("\n")
    agent = entry.get("agent")
    prefix = f"{when:%Y-%m-%d %H:%M:%S} {str(entry.get('level', '')).lower()} "
    text = f"{prefix}{f'[{agent}] ' if agent else ''}{entry.get('msg', '')}"
    return text + ("\n" + entry["exc"] if entry.get("exc") else "")


def _follow(handle: TextIO, out: TextIO, interval: float) -> None:
    """Print lines appended to ``handle`` until interrupted; survive truncation."""
    partial = ""
    while True:
        chunk = handle.readline()
        if chunk:
            partial += chunk
            if partial.endswith("\n"):
                out.write(human_line(partial) + "\n")
                out.flush()
                partial = ""
            continue
        if os.fstat(handle.fileno()).st_size < handle.tell():
            handle.seek(0)  # truncated (logrotate copytruncate)
        time.sleep(interval)


def _print_file(path: Path, follow: bool, out: TextIO, interval: float) -> None:
    with path.open(encoding="utf-8", errors="replace") as handle:
        lines = handle.readlines()
        for line in lines[-10:] if follow else lines:
            out.write(human_line(line) + "\n")
        out.flush()
        if follow:
            _follow(handle, out, interval)


def read_logs(
    agent: str | None,
    follow: bool,
    *,
    log_dir: Path,
    unit: str | None,
    user_unit: bool = True,
    out: TextIO | None = None,
    interval: float = 0.25,
) -> int:
    """Print an agent's (or the supervisor's) log; return the exit status.

    Under systemd (``unit`` given) this runs journalctl; otherwise it prints the
    JSON log file in human form, following appends with ``follow``.  Ctrl-C
    ends a follow with status 0.
    """
    out = out or sys.stdout
    if agent is not None and (not _SAFE_NAME.match(agent) or agent.startswith(".")):
        sys.stderr.write(f"agentctl: invalid agent name {agent!r}\n")
        return 2
    if unit:
        return _run_journalctl(journal_argv(unit, agent, follow, user_unit=user_unit))
    path = Path(log_dir) / ("supervisor.log" if agent is None else f"agents/{agent}.log")
    if not path.exists():
        what = f"agent {agent}" if agent else "the supervisor"
        sys.stderr.write(f"agentctl: no logs for {what} (no file {path})\n")
        return 1
    try:
        _print_file(path, follow, out, interval)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `agentctl swarm logs | head`
        return 0
    return 0


def _run_journalctl(argv: list[str]) -> int:
    try:
        proc = subprocess.Popen(argv)
    except FileNotFoundError:
        sys.stderr.write("agentctl: journalctl not found; is systemd installed?\n")
        return 1
    try:
        return proc.wait()
    except KeyboardInterrupt:  # journalctl got the same SIGINT from the terminal
        proc.wait()
        return 0
