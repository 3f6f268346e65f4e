"""StreamParser and classify() on recorded-style streams (tests/fakes/streams/*.jsonl)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from agentctl_swarm.session import _LineSplitter, clean_env, sanitize_path
from agentctl_swarm.streamjson import (
    TAIL_CHARS, Outcome, StreamParser, Usage, classify, is_retriable, one_line, spawn_failed,
)

STREAMS = Path(__file__).resolve().parent.parent / "fakes" / "streams"


def parse(name: str) -> tuple[StreamParser, list[str]]:
    parser = StreamParser()
    statuses = [s for s in (parser.feed(line) for line in (STREAMS / name).read_text().splitlines()) if s]
    return parser, statuses


def classify_stream(name: str, exit_code: int | None = 0, **kw) -> object:
    parser, _ = parse(name)
    kw.setdefault("signal", None)
    kw.setdefault("timed_out", False)
    kw.setdefault("stderr_tail", "")
    return classify(parser, exit_code=exit_code, **kw)


# ---- usage and cost ----------------------------------------------------------------
def test_success_prefers_final_result_usage_and_cost():
    parser, statuses = parse("success.jsonl")
    assert parser.usage == Usage(6, 62, 2783, 29414)
    assert parser.usage.total == 6 + 62 + 2783 + 29414
    assert parser.cost_usd == pytest.approx(0.024)
    assert parser.session_id == "3f2b8c1e-5d4a-4f0e-9b7a-1c2d3e4f5a6b"
    assert "tool: Write fake-output.txt" in statuses
    assert statuses[0] == "session started (model claude-sonnet-4-5)"


def test_usage_counts_each_message_id_once_without_result():
    parser, _ = parse("no_result.jsonl")
    # msg_02A appears twice with the same usage: counted once, plus msg_02B.
    assert parser.result is None
    assert parser.usage == Usage(3 + 3, 40 + 22, 2783 + 0, 14707 + 14707)
    assert parser.cost_usd == 0.0


def test_repeated_message_id_with_grown_usage_takes_latest():
    parser = StreamParser()
    for out in (10, 25):
        parser.feed(json.dumps({"type": "assistant", "message": {
            "id": "m1", "content": [], "usage": {"input_tokens": 5, "output_tokens": out}}}))
    assert parser.usage == Usage(5, 25, 0, 0)


def test_usage_to_dict_and_total():
    usage = Usage(1, 2, 3, 4)
    assert usage.to_dict() == {"input_tokens": 1, "output_tokens": 2,
                               "cache_creation_input_tokens": 3, "cache_read_input_tokens": 4}
    assert usage.total == 10


# ---- classification of each sample -------------------------------------------------
CASES = [
    # file, exit, outcome, reason, quota, retriable
    ("success.jsonl", 0, Outcome.DONE, "", False, False),
    ("no_result.jsonl", 0, Outcome.DONE, "", False, False),
    ("quota_session_limit.jsonl", 1, Outcome.FAIL, "quota", True, True),
    ("quota_weekly.jsonl", 1, Outcome.FAIL, "quota", True, True),
    ("quota_earlier.jsonl", 1, Outcome.FAIL, "quota", True, True),
    ("quota_2025.jsonl", 1, Outcome.FAIL, "quota", True, True),
    ("quota_credit.jsonl", 1, Outcome.FAIL, "quota", True, True),
    ("quota_429.jsonl", 0, Outcome.FAIL, "quota", True, True),
    ("throttle.jsonl", 1, Outcome.FAIL, "api-error", False, True),
    ("overflow_synthetic.jsonl", 1, Outcome.FAIL, "context-overflow", False, False),
    ("overflow_raw.jsonl", 1, Outcome.FAIL, "context-overflow", False, False),
    ("overflow_terminal.jsonl", 1, Outcome.FAIL, "context-overflow", False, False),
    ("deny.jsonl", 0, Outcome.BLOCKED, "sandbox-denied", False, False),
    ("api_error_529.jsonl", 0, Outcome.FAIL, "api-error", False, True),
    ("max_turns.jsonl", 1, Outcome.FAIL, "error-max-turns", False, False),
    ("model_mentions_errors.jsonl", 0, Outcome.DONE, "", False, False),
    ("plain_text.jsonl", 0, Outcome.DONE, "", False, False),
    ("plain_text.jsonl", 3, Outcome.FAIL, "exit-3", False, False),
    ("garbage.jsonl", 0, Outcome.DONE, "", False, False),
]


@pytest.mark.parametrize("name,code,outcome,reason,quota,retriable", CASES)
def test_classify_sample(name, code, outcome, reason, quota, retriable):
    result = classify_stream(name, code)
    assert (result.outcome, result.reason, result.quota, result.retriable) == (
        outcome, reason, quota, retriable)
    assert len(result.summary) <= 300 and "\n" not in result.summary


def test_every_sample_stream_is_covered():
    covered = {case[0] for case in CASES}
    assert covered == {p.name for p in STREAMS.glob("*.jsonl")}


def test_quota_reset_times():
    assert classify_stream("quota_session_limit.jsonl", 1).quota_resets_at == "2026-11-18T11:06:40+00:00"
    assert classify_stream("quota_earlier.jsonl", 1).quota_resets_at == "5pm"
    assert classify_stream("quota_2025.jsonl", 1).quota_resets_at == "2025-06-15T15:06:40+00:00"
    assert classify_stream("success.jsonl", 0).quota_resets_at is None


def test_done_summary_is_result_text():
    result = classify_stream("success.jsonl", 0)
    assert result.summary == "Done: wrote fake-output.txt."
    assert result.cost_usd == pytest.approx(0.024)
    assert result.usage.total == 32265


def test_deny_keeps_denials_and_summary():
    result = classify_stream("deny.jsonl", 0)
    assert result.permission_denials[0]["tool_name"] == "Write"
    assert result.summary == "permission denied: Write (1 denial)"


def test_plain_text_fallback_summary_and_partial_output():
    parser, statuses = parse("plain_text.jsonl")
    assert parser.text_lines == 3
    assert statuses == ["Working on the task...", "Edited 2 files.", "All done: plain text summary."]
    result = classify(parser, exit_code=0, signal=None, timed_out=False, stderr_tail="")
    assert result.summary == "All done: plain text summary."
    assert result.partial_output.endswith("Edited 2 files.\nAll done: plain text summary.")


def test_garbage_lines_do_not_break_the_parser():
    parser, statuses = parse("garbage.jsonl")
    assert parser.result_text == "ok after garbage"
    assert parser.usage == Usage(10, 5, 0, 0)  # bad result usage → per-message sum; bad counts → 0
    assert parser.cost_usd == 0.0 and parser.permission_denials == []
    assert "tool error: boom" in statuses
    assert all("\x1b" not in s for s in statuses)


def test_five_megabyte_line():
    parser = StreamParser()
    big = "y" * (5 * 1024 * 1024)
    status = parser.feed(json.dumps({"type": "assistant", "message": {
        "id": "m", "content": [{"type": "text", "text": big}], "usage": {"output_tokens": 7}}}))
    assert status is not None and len(status) <= len("assistant: ") + 120
    assert len(parser.partial_output) == TAIL_CHARS
    assert parser.usage.output_tokens == 7
    assert parser.feed("z" * (5 * 1024 * 1024)).endswith("\u2026")
    assert len(parser.partial_output) == TAIL_CHARS


# ---- precedence table ---------------------------------------------------------------
def stream(*names: str) -> StreamParser:
    parser = StreamParser()
    for name in names:
        for line in (STREAMS / name).read_text().splitlines():
            parser.feed(line)
    return parser


PRECEDENCE = [
    # streams, kwargs, expected reason
    (("quota_session_limit.jsonl",), dict(exit_code=None, signal=15, timed_out=True, cancelled=True), "cancelled"),
    (("quota_session_limit.jsonl",), dict(exit_code=None, signal=9, timed_out=True, oom=True), "timeout"),
    (("quota_session_limit.jsonl",), dict(exit_code=None, signal=9, oom=True), "oom"),
    (("success.jsonl",), dict(exit_code=0, oom=True), ""),  # the OOM hit a tool, the run succeeded
    (("no_result.jsonl",), dict(exit_code=1, stderr_tail="Traceback\nMemoryError\n"), "oom"),
    (("no_result.jsonl",), dict(exit_code=134, stderr_tail="FATAL ERROR: JavaScript heap out of memory"), "oom"),
    (("success.jsonl",), dict(exit_code=0, stderr_tail="Cannot allocate memory"), ""),
    (("overflow_synthetic.jsonl", "quota_session_limit.jsonl"), dict(exit_code=1), "quota"),
    (("deny.jsonl", "overflow_synthetic.jsonl"), dict(exit_code=1), "context-overflow"),
    (("api_error_529.jsonl", "deny.jsonl"), dict(exit_code=0), "sandbox-denied"),
    (("deny.jsonl", "api_error_529.jsonl"), dict(exit_code=0), "api-error"),  # last result wins
    (("api_error_529.jsonl",), dict(exit_code=1), "api-error"),
    (("no_result.jsonl",), dict(exit_code=2), "exit-2"),
    (("no_result.jsonl",), dict(exit_code=None, signal=11), "killed-SIGSEGV"),
    ((), dict(exit_code=0), ""),
    ((), dict(exit_code=None), "exit-unknown"),
    ((), dict(exit_code=1, stderr_tail="Claude AI usage limit reached|1750000000"), "quota"),
    ((), dict(exit_code=0, stderr_tail="Claude AI usage limit reached|1750000000"), ""),
    (("model_mentions_errors.jsonl",), dict(exit_code=0), ""),
    (("model_mentions_errors.jsonl",), dict(exit_code=None, signal=9), "killed-SIGKILL"),
]


@pytest.mark.parametrize("names,kwargs,reason", PRECEDENCE)
def test_classify_precedence(names, kwargs, reason):
    kwargs = dict(dict(signal=None, timed_out=False, stderr_tail=""), **kwargs)
    result = classify(stream(*names), **kwargs)
    assert result.reason == reason
    assert (result.outcome is Outcome.DONE) == (reason == "")


def test_rate_limit_event_alone_counts_only_when_the_run_failed():
    parser = StreamParser()
    parser.feed(json.dumps({"type": "rate_limit_event",
                            "rate_limit_info": {"status": "rejected", "resetsAt": 1795000000}}))
    ok = classify(parser, exit_code=0, signal=None, timed_out=False, stderr_tail="")
    bad = classify(parser, exit_code=1, signal=None, timed_out=False, stderr_tail="")
    assert (ok.reason, bad.reason, bad.quota_resets_at) == ("", "quota", "2026-11-18T11:06:40+00:00")


@pytest.mark.parametrize("resets_at,expected", [
    (1795000000, "2026-11-18T11:06:40+00:00"), (1795000000000, "2026-11-18T11:06:40+00:00"),
    (10 ** 30, None), ("tomorrow 9am", "tomorrow 9am"), (True, None)])
def test_rate_limit_resets_at_forms(resets_at, expected):
    parser = StreamParser()
    parser.feed(json.dumps({"type": "rate_limit_event",
                            "rate_limit_info": {"status": "rejected", "resetsAt": resets_at}}))
    assert parser.rate_limit_rejected and parser.resets_at == expected


def test_timeout_and_cancel_keep_partial_output():
    parser = stream("no_result.jsonl")
    result = classify(parser, exit_code=None, signal=9, timed_out=True, stderr_tail="", duration_s=1.25)
    assert result.summary == "timed out after 1.2s" or result.summary == "timed out after 1.3s"
    assert "Tests pass." in result.partial_output and not result.retriable


def test_retriable_table_and_spawn_failed():
    assert [r for r in ("quota", "api-error", "cancelled", "killed-SIGKILL") if is_retriable(r)] == [
        "quota", "api-error", "cancelled", "killed-SIGKILL"]
    assert not any(is_retriable(r) for r in ("", "timeout", "oom", "context-overflow",
                                             "sandbox-denied", "error-max-turns", "exit-1", "spawn-failed"))
    result = spawn_failed("FileNotFoundError: [Errno 2] No such file or directory: 'nope'")
    assert (result.outcome, result.reason, result.retriable) == (Outcome.FAIL, "spawn-failed", False)
    assert result.to_dict()["outcome"] == "fail"


# ---- helpers ---------------------------------------------------------------------
def test_one_line_strips_controls_and_truncates():
    assert one_line("a\nb\tc\x1b[0m\u202edone", 100) == "a b c [0m done"
    assert one_line("x" * 500, 300) == "x" * 299 + "\u2026"


def test_line_splitter_drops_overlong_lines_across_chunks():
    splitter = _LineSplitter(limit=10)
    lines = splitter.feed(b"short\n" + b"L" * 8) + splitter.feed(b"L" * 8 + b"\nnext\npart")
    assert lines == ["short", "next"] and splitter.dropped == 1
    assert splitter.finish() == ["part"]


def test_clean_env_is_an_allowlist(tmp_path):
    base = {"PATH": "/usr/bin::.:relative:/bin:/usr/bin", "HOME": "/root", "USER": "alice",
            "LANG": "C.UTF-8", "CLAUDECODE": "1", "SSH_AUTH_SOCK": "/tmp/ssh", "AWS_SECRET_ACCESS_KEY": "x",
            "ANTHROPIC_API_KEY": "leak", "GITHUB_TOKEN": "t", "NOTIFY_SOCKET": "/run/n",
            "INVOCATION_ID": "i", "DBUS_SESSION_BUS_ADDRESS": "d", "LISTEN_FDS": "1"}
    env = clean_env(base, home=tmp_path, config_dir=tmp_path / "cfg", tmpdir=tmp_path / "tmp",
                    grants={"ANTHROPIC_API_KEY": "granted"}, extra={"FOO": "bar", "CLAUDECODE": "1"})
    assert env["PATH"] == "/usr/bin:/bin"
    assert env["HOME"] == str(tmp_path) and env["CLAUDE_CONFIG_DIR"] == str(tmp_path / "cfg")
    assert env["TMPDIR"] == str(tmp_path / "tmp") and env["USER"] == env["LOGNAME"] == "alice"
    assert env["ANTHROPIC_API_KEY"] == "granted" and env["FOO"] == "bar" and env["LANG"] == "C.UTF-8"
    assert not {"CLAUDECODE", "SSH_AUTH_SOCK", "AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN", "NOTIFY_SOCKET",
                "INVOCATION_ID", "DBUS_SESSION_BUS_ADDRESS", "LISTEN_FDS"} & set(env)
    assert env["DISABLE_AUTOUPDATER"] == "1"
    with pytest.raises(ValueError, match="invalid environment variable name"):
        clean_env(base, home=tmp_path, config_dir=tmp_path, tmpdir=tmp_path, extra={"A=B": "x"})


def test_sanitize_path_default():
    assert sanitize_path(None).startswith("/usr/local/sbin")
    assert sanitize_path(".:bin") == sanitize_path(None)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["type", "message", "content", "usage", "id", "result", "is_error", "text",
                         "permission_denials", "rate_limit_info", "status", "resetsAt", "error",
                         "input_tokens", "subtype", "api_error_status", "model", "name", "input"]),
        inner, max_size=6),
    max_leaves=25)


@settings(max_examples=100, deadline=None)
@given(st.lists(JSON | st.text(max_size=80), max_size=6), st.integers(-20, 255))
def test_parser_and_classify_never_raise(items, code):
    parser = StreamParser()
    for item in items:
        line = item if isinstance(item, str) else json.dumps(item)
        status = parser.feed(line)
        assert status is None or ("\n" not in status and len(status) <= 140)
    result = classify(parser, exit_code=code if code >= 0 else None, signal=-code if code < 0 else None,
                      timed_out=False, stderr_tail="")
    assert len(result.summary) <= 300 and result.usage.total >= 0 and result.cost_usd >= 0
