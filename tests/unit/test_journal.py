"""Logging setup: JSON files, the per-agent split, journald fields, stderr, `logs`."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentctl_swarm.system import journal
from agentctl_swarm.system.journal import detach_logging, log_fields, read_logs, setup_logging

log = logging.getLogger("agentctl_swarm.test")


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    level = logging.getLogger().level
    yield
    detach_logging(close=True)
    logging.getLogger().setLevel(level)


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_json_lines_carry_the_agent_fields(tmp_path: Path) -> None:
    setup_logging(log_dir=tmp_path, journal=False, stderr=False)
    log.info("daemon %s restarted", "swarm-builder-003",
             extra=log_fields(agent="swarm-builder-003", role="builder", event="restart", exit_code=1))
    log.warning("budget at %d%%", 80, extra=log_fields(task="t-17", process="x", name=None))
    first, second = _lines(tmp_path / "supervisor.log")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(first.pop("ts")))
    assert first == {"level": "INFO", "logger": "agentctl_swarm.test", "msg": "daemon swarm-builder-003 restarted",
                     "agent": "swarm-builder-003", "role": "builder", "event": "restart", "exit_code": 1}
    second.pop("ts")
    assert second == {"level": "WARNING", "logger": "agentctl_swarm.test", "msg": "budget at 80%",
                      "task": "t-17", "process": "x"}


def test_exceptions_are_logged_in_the_line(tmp_path: Path) -> None:
    setup_logging(log_dir=tmp_path, journal=False, stderr=False)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("spawn failed", extra=log_fields(agent="a1"))
    (entry,) = _lines(tmp_path / "supervisor.log")
    assert entry["msg"] == "spawn failed" and "RuntimeError: boom" in str(entry["exc"])


def test_per_agent_files_hold_only_their_agent(tmp_path: Path) -> None:
    setup_logging(log_dir=tmp_path, journal=False, stderr=False)
    log.info("one", extra=log_fields(agent="a1"))
    log.info("two", extra=log_fields(agent="a2"))
    log.info("supervisor only")
    log.info("three", extra=log_fields(agent="a1"))
    assert [e["msg"] for e in _lines(tmp_path / "agents" / "a1.log")] == ["one", "three"]
    assert [e["msg"] for e in _lines(tmp_path / "agents" / "a2.log")] == ["two"]
    assert len(_lines(tmp_path / "supervisor.log")) == 4
    assert sorted(os.listdir(tmp_path / "agents")) == ["a1.log", "a2.log"]


def test_a_record_is_formatted_once_for_both_files(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The supervisor's file and the agent's file write the same line, made once."""
    made: list[str] = []
    real = journal.JsonFormatter._format

    def counting(self: journal.JsonFormatter, record: logging.LogRecord) -> str:
        made.append(record.getMessage())
        return real(self, record)

    monkeypatch.setattr(journal.JsonFormatter, "_format", counting)
    setup_logging(log_dir=tmp_path, journal=False, stderr=False)
    log.info("started %s", "a1", extra=log_fields(agent="a1", event="spawn"))
    log.info("ready %s", "a1", extra=log_fields(agent="a1", event="boot"))
    assert made == ["started a1", "ready a1"]
    assert (tmp_path / "agents" / "a1.log").read_text() == (tmp_path / "supervisor.log").read_text()
    assert [e["msg"] for e in _lines(tmp_path / "agents" / "a1.log")] == ["started a1", "ready a1"]


def _open_fds_under(directory: Path) -> int:
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{name}").startswith(str(directory))
        except FileNotFoundError:
            pass
    return count


def test_agent_files_are_bounded_lru(tmp_path: Path) -> None:
    setup_logging(log_dir=tmp_path, journal=False, stderr=False, max_open_agent_files=8)
    for round_ in range(2):
        for n in range(100):
            log.info("round %d", round_, extra=log_fields(agent=f"swarm-general-{n:03d}"))
    assert _open_fds_under(tmp_path / "agents") == 8
    assert len(os.listdir(tmp_path / "agents")) == 100
    assert [e["msg"] for e in _lines(tmp_path / "agents" / "swarm-general-042.log")] == ["round 0", "round 1"]


def test_unsafe_agent_name_never_becomes_a_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(log_dir=tmp_path / "logs", journal=False, stderr=False)
    log.info("evil", extra=log_fields(agent="../../escape"))
    assert not (tmp_path / "escape.log").exists()
    assert len(_lines(tmp_path / "logs" / "supervisor.log")) == 1
    assert "not safe as a file name" in capsys.readouterr().err


def test_disk_full_is_one_line_and_logging_goes_on(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """/dev/full fails every write with ENOSPC, like a full disk."""
    (tmp_path / "supervisor.log").symlink_to("/dev/full")
    setup_logging(log_dir=tmp_path, journal=False, stderr=True)
    for n in range(50):
        log.info("message %d", n, extra=log_fields(agent="a1"))
    err = capsys.readouterr().err
    failures = [line for line in err.splitlines() if "failed" in line]
    assert failures == [f"agentctl-swarm: writing {tmp_path / 'supervisor.log'} failed: [Errno 28] No space left on device"]
    assert "Traceback" not in err
    assert err.count("[a1] message") == 50  # stderr still gets every record
    assert len(_lines(tmp_path / "agents" / "a1.log")) == 50  # so does the agent file


def test_stderr_line_is_short_and_human(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(log_dir=tmp_path, journal=False)
    log.info("heartbeat missed", extra=log_fields(agent="swarm-qa-001"))
    log.debug("not shown at INFO")
    log.error("relay down")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert re.fullmatch(r"\d\d:\d\d:\d\d info \[swarm-qa-001\] heartbeat missed", lines[0])
    assert re.fullmatch(r"\d\d:\d\d:\d\d error relay down", lines[1])


def test_setup_twice_replaces_handlers(tmp_path: Path) -> None:
    setup_logging(log_dir=tmp_path / "one", journal=False, stderr=False)
    setup_logging(log_dir=tmp_path / "two", journal=False, stderr=False)
    log.info("once")
    assert not (tmp_path / "one" / "supervisor.log").exists()
    assert len(_lines(tmp_path / "two" / "supervisor.log")) == 1


def test_journal_auto_needs_systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    setup_logging(log_dir=tmp_path)
    kinds = {type(h).__name__ for h in logging.getLogger().handlers}
    assert "StderrHandler" in kinds and "SwarmJournalHandler" not in kinds


# -- the journal --------------------------------------------------------------

CAPTURE = r"""
import logging, os, socket, sys
from pathlib import Path
from agentctl_swarm.system.journal import log_fields, setup_logging
os.makedirs("/run/systemd/journal", exist_ok=True)
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.bind("/run/systemd/journal/socket")
sock.settimeout(5)
os.environ["INVOCATION_ID"] = "0" * 32
setup_logging(log_dir=Path(sys.argv[1]))
logging.getLogger("t").warning("daemon %s crashed", "a1",
    extra=log_fields(agent="swarm-builder-003", role="builder", task="t-9", event="crash", exit_code=1))
sys.stdout.buffer.write(sock.recv(65536))
"""


def test_journal_fields_reach_the_journal_socket(tmp_path: Path) -> None:
    """libsystemd's real datagram, caught on a socket at the journal's path.

    The socket lives in a private mount namespace (a tmpfs over /run/systemd),
    so a journald on this machine, or anything else, is never disturbed.
    """
    pytest.importorskip("systemd.journal", reason="systemd-python is not installed")
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) for a private mount namespace")
    script = f"mount -t tmpfs tmpfs /run/systemd && exec {sys.executable} -c '{CAPTURE}' {tmp_path}"
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                         capture_output=True, timeout=30)
    if out.returncode != 0 and b"unshare failed" in out.stderr:
        pytest.skip(f"cannot create a mount namespace here: {out.stderr.decode().strip()}")
    assert out.returncode == 0, out.stderr.decode()
    fields = dict(line.split("=", 1) for line in out.stdout.decode().splitlines() if "=" in line)
    assert fields["MESSAGE"] == "daemon a1 crashed"
    assert fields["PRIORITY"] == "4"
    assert fields["SYSLOG_IDENTIFIER"] == "agentctl-swarm"
    assert (fields["AGENT_NAME"], fields["AGENT_ROLE"], fields["TASK_ID"], fields["EVENT"]) == (
        "swarm-builder-003", "builder", "t-9", "crash")
    assert fields["EXIT_CODE"] == "1"
    assert len(_lines(tmp_path / "supervisor.log")) == 1  # the file log is written under systemd too


def test_real_journald_selects_by_agent_name(tmp_path: Path) -> None:
    pytest.importorskip("systemd.journal", reason="systemd-python is not installed")
    if not Path("/run/systemd/journal/socket").is_socket():
        pytest.skip("no journald here (/run/systemd/journal/socket is absent)")
    agent = f"test-{uuid.uuid4().hex[:12]}"
    setup_logging(log_dir=tmp_path, journal=True)
    log.info("hello journal", extra=log_fields(agent=agent))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        out = subprocess.run(["journalctl", "--no-pager", "-o", "cat", f"AGENT_NAME={agent}"],
                             capture_output=True, text=True)
        if "hello journal" in out.stdout:
            return
        time.sleep(0.2)
    pytest.fail(f"journalctl AGENT_NAME={agent} never showed the entry")


# -- reading: `agentctl swarm logs` ---------------------------------------------


def _write_logs(log_dir: Path) -> None:
    setup_logging(log_dir=log_dir, journal=False, stderr=False)
    log.info("supervisor started")
    log.info("heartbeat", extra=log_fields(agent="swarm-builder-001"))
    detach_logging(close=True)


def test_read_logs_prints_human_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_logs(tmp_path)
    assert read_logs(None, False, log_dir=tmp_path, unit=None) == 0
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d info supervisor started", lines[0])
    assert lines[1].endswith("info [swarm-builder-001] heartbeat")
    assert read_logs("swarm-builder-001", False, log_dir=tmp_path, unit=None) == 0
    assert capsys.readouterr().out.splitlines() == lines[1:]


def test_read_logs_unknown_agent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_logs(tmp_path)
    assert read_logs("swarm-nobody-999", False, log_dir=tmp_path, unit=None) == 1
    err = capsys.readouterr().err
    assert err.startswith("agentctl: no logs for agent swarm-nobody-999") and err.count("\n") == 1
    assert read_logs("../etc", False, log_dir=tmp_path, unit=None) == 2


FOLLOW = """
import sys
from pathlib import Path
from agentctl_swarm.system.journal import read_logs
sys.exit(read_logs(sys.argv[2] or None, True, log_dir=Path(sys.argv[1]), unit=None, interval=0.05))
"""


def test_follow_prints_appends_and_ctrl_c_exits_zero(tmp_path: Path) -> None:
    _write_logs(tmp_path)
    reader = subprocess.Popen([sys.executable, "-c", FOLLOW, str(tmp_path), "swarm-builder-001"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout is not None
        assert reader.stdout.readline().endswith("[swarm-builder-001] heartbeat\n")
        setup_logging(log_dir=tmp_path, journal=False, stderr=False)
        log.info("claimed task", extra=log_fields(agent="swarm-builder-001"))
        assert reader.stdout.readline().endswith("[swarm-builder-001] claimed task\n")
        reader.send_signal(signal.SIGINT)
        assert reader.wait(timeout=10) == 0
    finally:
        reader.kill()
        reader.wait()


def test_journal_argv() -> None:
    assert journal.journal_argv("agentctl-swarm.service", "swarm-qa-002", True) == [
        "journalctl", "--user-unit", "agentctl-swarm.service", "-o", "short", "AGENT_NAME=swarm-qa-002", "--follow"]
    assert journal.journal_argv("agentctl-swarm@bob.service", None, False, user_unit=False) == [
        "journalctl", "--unit", "agentctl-swarm@bob.service", "-o", "short"]


def test_current_unit_outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    assert journal.current_unit() is None


def test_log_files_rotate_past_the_size_limit(tmp_path, monkeypatch) -> None:
    """Session output is logged line by line: files must not grow without bound."""
    import logging as _logging
    from agentctl_swarm.system import journal as j
    monkeypatch.setattr(j, "MAX_LOG_BYTES", 4096)
    handler = j.JsonFileHandler(tmp_path / "supervisor.log")
    agents = j.AgentFilesHandler(tmp_path / "agents")
    logger = _logging.getLogger("rotation-test")
    logger.propagate = False
    logger.addHandler(handler)
    logger.addHandler(agents)
    try:
        for i in range(200):
            logger.warning("line %d %s", i, "x" * 100, extra=j.log_fields(agent="swarm-qa-001"))
    finally:
        logger.removeHandler(handler)
        logger.removeHandler(agents)
        handler.close()
        agents.close()
    for base in (tmp_path / "supervisor.log", tmp_path / "agents" / "swarm-qa-001.log"):
        sizes = [p.stat().st_size for p in (base, base.with_name(base.name + ".1"), base.with_name(base.name + ".2"))]
        assert all(size < 4096 + 512 for size in sizes), sizes
        assert not base.with_name(base.name + ".3").exists()
        assert "line 199" in base.read_text()
