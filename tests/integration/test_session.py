"""Session with real processes: tests/fakes/fake_claude.py in each of its modes."""
from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from agentctl_swarm.session import Outcome, Session, SessionResult, clean_env

FAKE = Path(__file__).resolve().parent.parent / "fakes" / "fake_claude.py"
CMD = [sys.executable, str(FAKE), "-p", "--output-format", "stream-json", "--verbose"]


def session_env(tmp_path: Path, base: dict | None = None, **kw) -> dict[str, str]:
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return clean_env(os.environ if base is None else base, home=tmp_path,
                     config_dir=tmp_path / ".claude", tmpdir=tmp_path / "tmp", **kw)


def make(tmp_path: Path, prompt: str, **kw) -> Session:
    kw.setdefault("env", session_env(tmp_path))
    kw.setdefault("max_duration", 20.0)
    return Session(kw.pop("argv", CMD + [prompt]), cwd=tmp_path, **kw)


def run(session: Session) -> SessionResult:
    return asyncio.run(asyncio.wait_for(session.run(), 30))


def live_members(pgid: int) -> list[int]:
    """Non-zombie processes still in the process group."""
    members = []
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) == pgid and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                members.append(pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return members


def gone(pid: int, within: float = 2.0) -> bool:
    """Dead (a zombie counts: PID 1 here does not reap), allowing for SIGKILL delivery."""
    deadline = time.monotonic() + within
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)


def group_empty(pgid: int, within: float = 2.0) -> bool:
    deadline = time.monotonic() + within
    while live_members(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_success_records_tokens_and_writes_file(tmp_path):
    session = make(tmp_path, "write a file [fake:tokens:5000]")
    result = run(session)
    assert (result.outcome, result.reason, result.exit_code) == (Outcome.DONE, "", 0)
    assert result.summary == "Used about 5000 tokens."
    assert result.usage.total == 5000 and result.cost_usd > 0
    assert uuid.UUID(result.session_id)
    assert (tmp_path / "fake-output.txt").read_text().startswith("hello from fake claude")
    assert "I'll create the file now." in result.partial_output


def test_fail(tmp_path):
    result = run(make(tmp_path, "[fake:fail]"))
    assert (result.outcome, result.reason, result.exit_code, result.retriable) == (
        Outcome.FAIL, "exit-1", 1, False)


@pytest.mark.parametrize("mode,expected_signal,min_s", [
    ("hang", signal.SIGTERM, 1.0), ("hang-ignore-term", signal.SIGKILL, 1.5)])
def test_hang_times_out_and_leaves_nothing(tmp_path, mode, expected_signal, min_s):
    session = make(tmp_path, "[fake:%s]" % mode, max_duration=1.0, grace=0.5)
    started = time.monotonic()
    result = run(session)
    elapsed = time.monotonic() - started
    assert (result.outcome, result.reason, result.signal) == (Outcome.FAIL, "timeout", expected_signal)
    assert min_s <= elapsed < min_s + 5.0  # generous: CI machines are shared
    child = int((tmp_path / "fake-child.pid").read_text())
    assert gone(child) and group_empty(session.pgid)


def test_quota(tmp_path):
    result = run(make(tmp_path, "[fake:quota]"))
    assert (result.outcome, result.reason, result.quota, result.retriable) == (
        Outcome.FAIL, "quota", True, True)
    assert result.quota_resets_at and result.quota_resets_at.endswith("+00:00")
    assert "You've hit your session limit" in result.summary


def test_quota_old_wording(tmp_path):
    result = run(make(tmp_path, "[fake:quota-old]"))
    assert (result.reason, result.quota) == ("quota", True)
    assert result.quota_resets_at.endswith("+00:00")


def test_quota_while_flag_file_exists(tmp_path):
    flag = tmp_path / "quota-flag"
    flag.write_text("1")
    assert run(make(tmp_path, "[fake:quota-while:%s]" % flag)).reason == "quota"
    flag.unlink()
    assert run(make(tmp_path, "[fake:quota-while:%s]" % flag)).outcome is Outcome.DONE


def test_throttle_is_not_quota(tmp_path):
    result = run(make(tmp_path, "[fake:throttle]"))
    assert (result.reason, result.quota, result.retriable) == ("api-error", False, True)


def test_overflow_keeps_partial_output(tmp_path):
    result = run(make(tmp_path, "[fake:overflow]"))
    assert (result.outcome, result.reason, result.retriable) == (Outcome.FAIL, "context-overflow", False)
    assert "Reading the whole repository." in result.partial_output


def test_deny_is_blocked(tmp_path):
    result = run(make(tmp_path, "[fake:deny]"))
    assert (result.outcome, result.reason, result.exit_code) == (Outcome.BLOCKED, "sandbox-denied", 0)
    assert result.permission_denials[0]["tool_name"] == "Write"


def test_api_error_with_exit_zero(tmp_path):
    result = run(make(tmp_path, "[fake:api-error]"))
    assert (result.outcome, result.reason, result.exit_code, result.retriable) == (
        Outcome.FAIL, "api-error", 0, True)


def test_max_turns(tmp_path):
    result = run(make(tmp_path, "[fake:max-turns]"))
    assert (result.reason, result.retriable) == ("error-max-turns", False)


def test_plain_text_mode(tmp_path):
    result = run(make(tmp_path, "[fake:text]"))
    assert (result.outcome, result.summary) == (Outcome.DONE, "All done: plain text summary.")
    assert result.usage.total == 0 and result.session_id is None


def test_crash_with_half_a_line(tmp_path):
    result = run(make(tmp_path, "[fake:crash]"))
    assert (result.outcome, result.reason, result.signal, result.retriable) == (
        Outcome.FAIL, "killed-SIGABRT", signal.SIGABRT, True)
    assert "About to crash." in result.partial_output
    assert result.partial_output.endswith('{"type":"assistant","message":{"id":"msg_half","content":[{"ty')


def test_claudecode_is_removed_by_clean_env(tmp_path):
    base = dict(os.environ, CLAUDECODE="1")
    refused = run(make(tmp_path, "[fake:success]", env=dict(base)))
    assert (refused.reason, refused.exit_code) == ("exit-1", 1)
    assert "Error: Claude Code cannot be launched inside another Claude Code session" in refused.summary
    result = run(make(tmp_path, "[fake:success]", env=session_env(tmp_path, base)))
    assert result.outcome is Outcome.DONE


def test_env_mode_sees_only_the_allowlist(tmp_path):
    base = {"PATH": os.environ.get("PATH", ""), "USER": "u", "SSH_AUTH_SOCK": "/x",
            "AWS_PROFILE": "p", "ANTHROPIC_API_KEY": "user-key", "CLAUDECODE": "1"}
    env = session_env(tmp_path, base, grants={"CLAUDE_CODE_OAUTH_TOKEN": "tok"}, extra={"FOO": "1"})
    result = run(make(tmp_path, "[fake:env]", env=env))
    seen = json.loads((tmp_path / "fake-env.json").read_text())
    assert result.outcome is Outcome.DONE
    assert seen["auth"] == {"CLAUDE_CONFIG_DIR": True, "ANTHROPIC_API_KEY": False,
                            "CLAUDE_CODE_OAUTH_TOKEN": True}
    assert not {"SSH_AUTH_SOCK", "AWS_PROFILE", "CLAUDECODE"} & set(seen["names"])
    assert {"FOO", "HOME", "PATH", "TMPDIR", "PWD"} <= set(seen["names"])


def test_status_is_throttled_and_last_one_flushed(tmp_path):
    calls: list[tuple[float, str]] = []
    session = make(tmp_path, "[fake:slow:1.5:15]", status_interval=0.5,
                   on_status=lambda text: calls.append((time.monotonic(), text)))
    result = run(session)
    assert result.outcome is Outcome.DONE
    assert 2 <= len(calls) <= result.duration_s / 0.5 + 2  # ~20 interesting lines were offered
    gaps = [b[0] - a[0] for a, b in zip(calls, calls[1:-1])]
    assert all(gap >= 0.45 for gap in gaps)
    assert calls[-1][1].startswith("assistant: Wrote fake-output.txt")


def test_terminate_mid_run_is_cancelled_with_partial_output(tmp_path):
    async def scenario() -> tuple[SessionResult, Session]:
        session = make(tmp_path, "[fake:slow:20:200]", grace=1.0)
        await session.start()
        waiter = asyncio.create_task(session.wait())
        while "step 3 of" not in session.parser.partial_output:
            await asyncio.sleep(0.02)
        session.terminate()
        return await asyncio.wait_for(waiter, 10), session

    started = time.monotonic()
    result, session = asyncio.run(scenario())
    assert (result.outcome, result.reason, result.retriable) == (Outcome.FAIL, "cancelled", True)
    assert "Working, step 3 of 200." in result.partial_output
    assert time.monotonic() - started < 10 and group_empty(session.pgid)


def test_cancelling_wait_kills_the_group(tmp_path):
    async def scenario() -> Session:
        session = make(tmp_path, "[fake:hang-ignore-term]")
        await session.start()
        waiter = asyncio.create_task(session.wait())
        while not (tmp_path / "fake-child.pid").exists():
            await asyncio.sleep(0.02)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        return session

    session = asyncio.run(scenario())
    assert group_empty(session.pgid)
    assert gone(int((tmp_path / "fake-child.pid").read_text()))


def test_background_grandchild_is_killed_after_exit(tmp_path, caplog):
    result = run(make(tmp_path, "[fake:orphan]"))  # the grandchild holds stdout open
    assert result.outcome is Outcome.DONE
    assert gone(int((tmp_path / "fake-child.pid").read_text()))
    assert "pipe still open" not in caplog.text  # the group kill closed it, no drain timeout


def test_line_over_4_mib_is_dropped_and_reading_goes_on(tmp_path):
    lines: list[str] = []
    session = make(tmp_path, "[fake:bigline:5]", on_output=lambda stream, line: lines.append(stream))
    result = run(session)
    assert (result.outcome, session.dropped_lines) == (Outcome.DONE, 1)
    assert result.summary.startswith("Wrote fake-output.txt")
    assert "stdout" in lines


def test_memory_error_under_rlimit_is_oom(tmp_path):
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (300 << 20, 300 << 20))

    result = run(make(tmp_path, "[fake:alloc:400]", preexec_fn=limit))
    assert (result.outcome, result.reason, result.retriable) == (Outcome.FAIL, "oom", False)
    assert "MemoryError" in result.summary


def test_alloc_within_limits_succeeds(tmp_path):
    result = run(make(tmp_path, "[fake:alloc:20]"))
    assert result.outcome is Outcome.DONE and result.summary == "Allocated 20971520 bytes."


def test_stderr_reaches_on_output(tmp_path):
    seen: list[tuple[str, str]] = []
    argv = [sys.executable, str(FAKE), "-p", "--output-format", "stream-json", "x"]  # no --verbose
    result = run(make(tmp_path, "", argv=argv, on_output=lambda s, l: seen.append((s, l))))
    assert ("stderr", "Error: When using --print, --output-format=stream-json requires --verbose") in seen
    assert result.reason == "exit-1" and "requires --verbose" in result.summary


def test_pass_fds_reach_the_child(tmp_path):
    read_fd, write_fd = os.pipe()
    try:
        argv = [sys.executable, "-c", "import os; os.write(%d, b'hello')" % write_fd]
        result = run(make(tmp_path, "", argv=argv, pass_fds=(write_fd,)))
        assert result.outcome is Outcome.DONE and os.read(read_fd, 16) == b"hello"
    finally:
        os.close(read_fd)
        os.close(write_fd)


@pytest.mark.parametrize("argv,needle", [
    (["/nonexistent/claude", "-p"], "No such file"),
    ([str(Path(__file__))], "Permission denied"),  # not executable
])
def test_spawn_failed(tmp_path, argv, needle):
    session = make(tmp_path, "", argv=argv)
    assert asyncio.run(session.start()) is None and session.pid is None
    result = asyncio.run(session.wait())
    assert (result.outcome, result.reason, result.retriable) == (Outcome.FAIL, "spawn-failed", False)
    assert needle in result.summary


def test_preexec_failure_is_spawn_failed(tmp_path):
    def boom() -> None:
        raise OSError("cannot join cgroup")

    result = run(make(tmp_path, "[fake:success]", preexec_fn=boom))
    assert result.reason == "spawn-failed" and "preexec" in result.summary
