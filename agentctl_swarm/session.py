"""One agent session: run `claude -p`, parse its stream-json, classify the outcome.

Design note (OS behaviour this module relies on)
-------------------------------------------------
* Process group. The child is started with ``start_new_session=True``, so it leads
  a new session and process group and ``pgid == pid``. Every signal goes to the
  group (``os.killpg``): the agent's tool processes (Bash commands, test runners)
  die with it. When the leader has exited, the group gets one more SIGKILL so
  nothing the agent started in the background outlives the session. The kernel
  does not hand out a PID while a process group of that number still has
  members, so the only reuse window is between asyncio reaping an empty group's
  leader and our ``killpg`` a few microseconds later; we accept it.
* Reading. Output arrives through a ``SubprocessProtocol`` and is split into
  lines here, with a 4 MiB cap per line: a longer line is dropped (and counted)
  and reading goes on, where ``StreamReader.readline`` would raise and lose its
  place. The daemon keeps a session for hours, so nothing accumulates: the
  parser keeps running totals, a bounded map of recent message ids and a 4 KB
  text tail; stderr keeps an 8 KB tail.
* Exit versus EOF. A grandchild that inherited stdout keeps the pipe open after
  the leader exits, and asyncio's ``Process.wait()`` waits for the pipes too.
  So the protocol's ``process_exited`` is the signal: then we kill the group
  and give the pipes a short time (DRAIN_TIMEOUT) to deliver what is buffered.
* Deadlines. ``max_duration`` counts from ``start()``. On expiry, and on
  ``terminate()``: SIGTERM to the group, SIGKILL ``grace`` seconds later.
* Classification of the outcome lives in ``streamjson.py``.
"""
from __future__ import annotations
from __future__ import annotations

import asyncio
import logging
import os
import pwd
import re
import signal as signal_mod
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from .streamjson import (DRAIN_TIMEOUT, LINE_LIMIT, STDERR_LINE_LIMIT, STDERR_TAIL_CHARS,
                         SessionResult, StreamParser, classify, spawn_failed)
# The result types, for callers that only deal with sessions.
from .streamjson import Outcome, Usage, is_retriable  # noqa: F401

log = logging.getLogger(__name__)
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# ---- environment ---------------------------------------------------------------
_PASSTHROUGH = ("LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "TERM", "TZ")
_FORBIDDEN = frozenset({"CLAUDECODE"})


def sanitize_path(value: str | None) -> str:
    """Absolute, de-duplicated PATH entries only: '' and '.' would run workspace files."""
    entries: list[str] = []
    for entry in (value or "").split(":"):
        if entry.startswith("/") and entry not in entries:
            entries.append(entry)
    return ":".join(entries) or DEFAULT_PATH


def _login_name(base: Mapping[str, str]) -> str:
    name = base.get("USER") or base.get("LOGNAME")
    if name:
        return name
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def _check_var(name: str, value: str) -> None:
    if not _NAME_RE.match(name):
        raise ValueError("invalid environment variable name: %r" % name)
    if "\0" in value:
        raise ValueError("environment variable %s contains a NUL byte" % name)


def clean_env(base: Mapping[str, str], *, home: Path, config_dir: Path, tmpdir: Path,
              grants: Mapping[str, str] = {}, extra: Mapping[str, str] = {}) -> dict[str, str]:
    """The whole environment of a session, built from an allowlist.

    Nothing else from `base` passes: no CLAUDECODE (claude refuses to start with
    it), no agent sockets, cloud or API credentials, no systemd variables.
    CLAUDE_CONFIG_DIR is per agent because concurrent sessions corrupt a shared
    one. CLAUDE_CODE_SUBPROCESS_ENV_SCRUB=1 keeps a granted ANTHROPIC_API_KEY /
    CLAUDE_CODE_OAUTH_TOKEN away from the agent's Bash tool (prompt injection).
    `extra` (plain config) then `grants` (secrets) are applied last and may
    override anything except CLAUDECODE.
    """
    user = _login_name(base)
    env = {"PATH": sanitize_path(base.get("PATH")), "HOME": str(home), "USER": user,
           "LOGNAME": user, "TMPDIR": str(tmpdir), "CLAUDE_CONFIG_DIR": str(config_dir),
           "DISABLE_AUTOUPDATER": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
           "CLAUDE_CODE_SUBPROCESS_ENV_SCRUB": "1"}
    env.update({k: base[k] for k in _PASSTHROUGH if base.get(k)})
    if base.get("SHELL", "").startswith("/"):
        env["SHELL"] = base["SHELL"]
    for source in (extra, grants):
        for name, value in source.items():
            _check_var(name, value)
            if name in _FORBIDDEN:
                log.warning("dropping %s from the session environment", name)
                continue
            env[name] = value
    return env


# ---- the runner ----------------------------------------------------------------
def _noop(*_args: Any) -> None:
    return None


class _LineSplitter:
    """Bytes → complete lines, each at most `limit` bytes; longer lines are dropped."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._buf = bytearray()
        self._skipping = False
        self.dropped = 0

    def feed(self, chunk: bytes) -> list[str]:
        lines: list[str] = []
        start = 0
        while (nl := chunk.find(b"\n", start)) >= 0:
            self._take(chunk[start:nl], lines, complete=True)
            start = nl + 1
        self._take(chunk[start:], lines, complete=False)
        return lines

    def finish(self) -> list[str]:
        """The unterminated last line (e.g. half a JSON object from a crash)."""
        lines: list[str] = []
        if self._buf and not self._skipping:
            self._take(b"", lines, complete=True)
        return lines

    def _take(self, piece: bytes, lines: list[str], complete: bool) -> None:
        if not self._skipping:
            self._buf += piece
            if len(self._buf) > self._limit:
                self._buf.clear()
                self._skipping = True
                self.dropped += 1
        if complete:
            if not self._skipping:
                lines.append(self._buf.decode("utf-8", "replace"))
            self._buf.clear()
            self._skipping = False


class _StatusThrottle:
    """At most one status per interval; the latest wins; flush() sends the pending one."""

    def __init__(self, emit: Callable[[str], None], interval: float) -> None:
        self._emit = emit
        self._interval = interval
        self._last = float("-inf")
        self._pending: str | None = None
        self._timer: asyncio.TimerHandle | None = None

    def submit(self, text: str) -> None:
        now = time.monotonic()
        if self._timer is None and now - self._last >= self._interval:
            self._send(text)
            return
        self._pending = text
        if self._timer is None:
            delay = self._last + self._interval - now
            self._timer = asyncio.get_running_loop().call_later(delay, self._fire)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._fire()

    def _fire(self) -> None:
        self._timer = None
        text, self._pending = self._pending, None
        if text is not None:
            self._send(text)

    def _send(self, text: str) -> None:
        self._last = time.monotonic()
        try:
            self._emit(text)
        except Exception:
            log.exception("on_status callback failed")


class _Protocol(asyncio.SubprocessProtocol):
    """Pipe data straight to the session; `exited` fires on the leader's exit status.

    asyncio's own ``Process.wait()`` also waits for the pipes to close, which a
    grandchild holding stdout would delay forever; hence this protocol.
    """

    def __init__(self, session: "Session", loop: asyncio.AbstractEventLoop) -> None:
        self._session = session
        self._open = {1, 2}
        self.exited: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        self._session._data(fd, data)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self._open.discard(fd)
        if not self._open and not self.closed.done():
            self.closed.set_result(None)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)


class Session:
    """One run of the agent command in its own process group; see the module docstring."""

    def __init__(self, argv: list[str], *, cwd: Path, env: dict[str, str], max_duration: float,
                 grace: float = 10.0, preexec_fn: Callable[[], None] | None = None,
                 pass_fds: tuple[int, ...] = (), on_status: Callable[[str], None] = _noop,
                 on_output: Callable[[str, str], None] = _noop,
                 status_interval: float = 10.0) -> None:
        self._argv = list(argv)
        self._cwd = Path(cwd)
        self._env = dict(env, PWD=str(cwd))
        self._max_duration = max_duration
        self._grace = grace
        self._preexec_fn = preexec_fn
        self._pass_fds = tuple(pass_fds)
        self._on_output = on_output
        self._throttle = _StatusThrottle(on_status, status_interval)
        self.parser = StreamParser()
        self._transport: asyncio.SubprocessTransport | None = None
        self._protocol: _Protocol | None = None
        self._pid: int | None = None
        self._spawn_error: str | None = None
        self._started = 0.0
        self._stdout = _LineSplitter(LINE_LIMIT)
        self._stderr = _LineSplitter(STDERR_LINE_LIMIT)
        self._stderr_tail = ""
        self._timed_out = False
        self._cancelled = False
        self._oom = False
        self._escalation: asyncio.Task | None = None
        self.result: SessionResult | None = None

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def pgid(self) -> int | None:
        """Equal to pid: start_new_session makes the child its group's leader."""
        return self._pid

    @property
    def dropped_lines(self) -> int:
        """Output lines longer than LINE_LIMIT that were skipped."""
        return self._stdout.dropped

    @property
    def running(self) -> bool:
        return self._protocol is not None and not self._protocol.exited.done()

    async def start(self) -> int | None:
        """Spawn the command; return its pid, or None when it could not be started."""
        if self._transport is not None or self._spawn_error is not None:
            raise RuntimeError("session already started")
        self._started = time.monotonic()
        try:
            self._transport, self._protocol = await self._spawn()
        except (OSError, subprocess.SubprocessError, ValueError, TypeError) as exc:
            self._spawn_error = "%s: %s" % (type(exc).__name__, exc)
            log.warning("session spawn failed: %s", self._spawn_error)
            return None
        self._pid = self._transport.get_pid()
        log.info("session started pid=%s argv0=%s cwd=%s", self._pid, self._argv[0], self._cwd)
        return self._pid

    async def _spawn(self) -> tuple[asyncio.SubprocessTransport, _Protocol]:
        if not self._argv:
            raise ValueError("empty command")
        loop = asyncio.get_running_loop()
        return await loop.subprocess_exec(
            lambda: _Protocol(self, loop), *self._argv, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=self._cwd, env=self._env,
            start_new_session=True, close_fds=True, pass_fds=self._pass_fds,
            preexec_fn=self._preexec_fn)

    async def run(self) -> SessionResult:
        await self.start()
        return await self.wait()

    async def wait(self) -> SessionResult:
        """Read until the command exits, enforce the deadline, kill leftovers, classify."""
        if self.result is not None:
            return self.result
        if self._transport is None or self._protocol is None:
            if self._spawn_error is None:
                raise RuntimeError("session not started")
            self.result = spawn_failed(self._spawn_error, time.monotonic() - self._started)
            return self.result
        self.result = await self._supervise(self._transport, self._protocol)
        return self.result

    async def _supervise(self, transport: asyncio.SubprocessTransport,
                         protocol: _Protocol) -> SessionResult:
        deadline = asyncio.create_task(self._enforce_deadline())
        try:
            await asyncio.shield(protocol.exited)
        except BaseException:  # our caller was cancelled: leave no process behind
            self._kill_group(signal_mod.SIGKILL)
            self._cancel_escalation()
            transport.close()
            raise
        finally:
            deadline.cancel()
        self._kill_group(signal_mod.SIGKILL)
        self._cancel_escalation()
        await self._drain(protocol)
        transport.close()
        self._throttle.flush()
        return self._classify(transport.get_returncode())

    def _classify(self, returncode: int | None) -> SessionResult:
        duration = time.monotonic() - self._started
        code = returncode if returncode is not None and returncode >= 0 else None
        sig = -returncode if returncode is not None and returncode < 0 else None
        result = classify(self.parser, exit_code=code, signal=sig, timed_out=self._timed_out,
                          stderr_tail=self._stderr_tail, oom=self._oom,
                          cancelled=self._cancelled, duration_s=duration)
        log.info("session pid=%s ended: %s %s (%s tokens, %.1fs)", self._pid,
                 result.outcome.value, result.reason or "-", result.usage.total, duration)
        return result

    def terminate(self, grace: float | None = None) -> None:
        """Shutdown: SIGTERM the group now, SIGKILL after `grace`; await wait() for the result."""
        if not self.running or self._cancelled:
            return
        self._cancelled = True
        self._start_escalation(self._grace if grace is None else grace)

    def mark_oom(self) -> None:
        """The caller's cgroup watcher saw an OOM kill in this session's group."""
        self._oom = True

    async def _enforce_deadline(self) -> None:
        await asyncio.sleep(max(0.0, self._started + self._max_duration - time.monotonic()))
        if self._cancelled:
            return
        log.warning("session pid=%s exceeded %.1fs; terminating", self._pid, self._max_duration)
        self._timed_out = True
        self._start_escalation(self._grace)

    def _start_escalation(self, grace: float) -> None:
        if self._escalation is None or self._escalation.done():
            self._escalation = asyncio.get_running_loop().create_task(self._escalate(grace))

    def _cancel_escalation(self) -> None:
        if self._escalation is not None:
            self._escalation.cancel()

    async def _escalate(self, grace: float) -> None:
        self._kill_group(signal_mod.SIGTERM)
        await asyncio.sleep(grace)
        if self.running:
            log.warning("session pid=%s ignored SIGTERM for %.1fs; killing", self._pid, grace)
        self._kill_group(signal_mod.SIGKILL)

    def _kill_group(self, sig: signal_mod.Signals) -> None:
        if self._pid is None:
            return
        try:
            os.killpg(self._pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError as exc:
            log.error("cannot signal process group %s: %s", self._pid, exc)

    async def _drain(self, protocol: _Protocol) -> None:
        """Let buffered output arrive; give up on pipes still held by an escaped process."""
        try:
            await asyncio.wait_for(asyncio.shield(protocol.closed), DRAIN_TIMEOUT)
        except asyncio.TimeoutError:
            log.warning("session pid=%s: output pipe still open after exit; closing it", self._pid)
        for line in self._stdout.finish():
            self._stdout_line(line)
        for line in self._stderr.finish():
            self._stderr_line(line)

    # ---- output (called by _Protocol) -------------------------------------------
    def _data(self, fd: int, data: bytes) -> None:
        if fd == 1:
            dropped = self._stdout.dropped
            for line in self._stdout.feed(data):
                self._stdout_line(line)
            if self._stdout.dropped > dropped:
                log.warning("session pid=%s: dropped an output line over %d bytes", self._pid, LINE_LIMIT)
        else:
            for line in self._stderr.feed(data):
                self._stderr_line(line)

    def _stdout_line(self, line: str) -> None:
        self._output("stdout", line)
        status = self.parser.feed(line)
        if status:
            self._throttle.submit(status)

    def _stderr_line(self, line: str) -> None:
        self._output("stderr", line)
        self._stderr_tail = (self._stderr_tail + line + "\n")[-STDERR_TAIL_CHARS:]

    def _output(self, stream: str, line: str) -> None:
        try:
            self._on_output(stream, line)
        except Exception:
            log.exception("on_output callback failed")
