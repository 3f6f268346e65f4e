"""The work-channel grammar: parse, format, and hostile lines."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentctl_swarm import verbs
from agentctl_swarm.verbs import (
    MAX_LINE, Assign, Blocked, Claim, Done, Fail, Heartbeat, Rejected, Status, Task, Unclaim,
    VerbError, is_valid_agent_name, is_valid_task_id, parse,
)

# --- table: valid lines -------------------------------------------------------

VALID = [
    ("TASK t-1 builder write the README", Task("t-1", "builder", "write the README")),
    ("TASK a.b_c any  two  spaces inside", None),  # double space after role: refused below
    ("CLAIM t-1 swarm-builder-001", Claim("t-1", "swarm-builder-001")),
    ("UNCLAIM t-1 swarm-qa-002", Unclaim("t-1", "swarm-qa-002")),
    ("ASSIGN 42 a", Assign("42", "a")),
    ("REJECTED 42 b_b", Rejected("42", "b_b")),
    ("STATUS x y editing foo.py  (3 files)", Status("x", "y", "editing foo.py  (3 files)")),
    ("DONE x y all green", Done("x", "y", "all green")),
    ("FAIL x y timeout", Fail("x", "y", "timeout")),
    ("BLOCKED x y sandbox-denied", Blocked("x", "y", "sandbox-denied")),
    ("HEARTBEAT swarm-general-001 idle", Heartbeat("swarm-general-001", "idle")),
    ("TASK T9 any émojis ok ✓", Task("T9", "any", "émojis ok ✓")),
]


@pytest.mark.parametrize("line,expected", [v for v in VALID if v[1] is not None])
def test_parse_valid_lines(line: str, expected: verbs.Verb) -> None:
    assert parse(line) == expected
    assert verbs.format(expected) == line


@pytest.mark.parametrize("line", [
    "hello everyone", "", " TASK x any leading space is chatter", "task x any lower case",
    "TASKS x any not the verb", "CLAIMED x y", "HEARTBEAT\tx idle", "@agent CLAIM x y",
])
def test_chatter_is_ignored(line: str) -> None:
    assert parse(line) is None


@pytest.mark.parametrize("line,why", [
    ("TASK", "no fields"),
    ("TASK x", "missing role and prompt"),
    ("TASK x builder", "missing prompt"),
    ("TASK x builder ", "empty prompt"),
    ("TASK x wizard do it", "unknown role"),
    ("TASK a.b_c any  two spaces", "double space before text"),
    ("CLAIM x", "one field"),
    ("CLAIM x y z", "three fields"),
    ("CLAIM x  y", "double space"),
    ("CLAIM x y ", "trailing space"),
    ("CLAIM ../etc y", "dot-dot id"),
    ("CLAIM .hidden y", "leading dot"),
    ("CLAIM -rf y", "leading dash"),
    ("CLAIM a..b y", "dot-dot inside"),
    ("CLAIM a. y", "trailing dot"),
    ("CLAIM x.lock y", "git .lock suffix"),
    ("CLAIM x.LOCK y", ".lock suffix, any case"),
    ("CLAIM a/b y", "slash"),
    ("CLAIM a@{1} y", "@{"),
    ("CLAIM " + "a" * 65 + " y", "id too long"),
    ("CLAIM x " + "n" * 33, "name too long"),
    ("CLAIM x bad.name", "dot in name"),
    ("CLAIM x y\n", "newline"),
    ("DONE x y ok\nASSIGN x evil", "embedded newline"),
    ("DONE x y ok\x00", "NUL"),
    ("DONE x y ok\x1b[31m", "escape sequence"),
    ("DONE x y ok\u2028more", "line separator"),
    ("DONE x y \ud800", "lone surrogate"),
    ("DONE x y", "no summary"),
    ("HEARTBEAT x", "no status"),
    ("HEARTBEAT x Idle", "upper-case status"),
    ("HEARTBEAT x idle now", "extra field"),
    ("HEARTBEAT x " + "a" * 33, "status too long"),
    ("STATUS x y " + "z" * MAX_LINE, "over-long line"),
])
def test_broken_verbs_are_refused(line: str, why: str) -> None:
    with pytest.raises(VerbError):
        parse(line)


def test_ten_thousand_character_line_is_refused_quickly() -> None:
    with pytest.raises(VerbError, match="exceeds"):
        parse("TASK x any " + "A" * 10_000)
    assert parse("hello " + "A" * 10_000) is None


def test_non_string_input_is_a_verb_error() -> None:
    with pytest.raises(VerbError):
        parse(b"CLAIM x y")  # type: ignore[arg-type]


def test_max_length_line_is_accepted() -> None:
    head = "STATUS x y "
    line = head + "z" * (MAX_LINE - len(head))
    assert parse(line) == Status("x", "y", "z" * (MAX_LINE - len(head)))


# --- format -----------------------------------------------------------------

def test_format_collapses_control_characters_and_truncates() -> None:
    line = verbs.format(Done("t1", "a", "line one\n\nline two\ttab\x1b[0m" + "x" * 10_000))
    assert len(line) == MAX_LINE
    assert line.startswith("DONE t1 a line one line two tab [0mxxx")
    assert line.endswith("\u2026")
    assert parse(line) is not None


def test_format_strips_leading_space_of_text() -> None:
    assert verbs.format(Fail("t", "a", "\n  reason")) == "FAIL t a reason"


@pytest.mark.parametrize("verb", [
    Claim("../x", "a"), Claim("x", "a b"), Task("x", "wizard", "p"), Task("x", "any", " \n "),
    Heartbeat("a", "IDLE"), Done("x.lock", "a", "ok"), Status("x", "", "t"),
])
def test_format_refuses_what_parse_refuses(verb: verbs.Verb) -> None:
    with pytest.raises(VerbError):
        verbs.format(verb)


def test_format_refuses_non_verbs() -> None:
    with pytest.raises(TypeError):
        verbs.format("CLAIM x y")  # type: ignore[arg-type]


# --- ids --------------------------------------------------------------------

@pytest.mark.parametrize("s,ok", [
    ("a", True), ("A.b-c_9", True), ("x" * 64, True), ("x" * 65, False), ("", False),
    (".", False), ("..", False), ("-x", False), (".x", False), ("a..b", False), ("a.", False),
    ("a.lock", False), ("a.lockx", True), ("a b", False), ("a/b", False), ("é", False),
    (None, False), (5, False),
])
def test_task_ids(s: object, ok: bool) -> None:
    assert is_valid_task_id(s) is ok


@pytest.mark.parametrize("s,ok", [
    ("a", True), ("-", True), ("swarm-builder-001", True), ("n" * 32, True), ("n" * 33, False),
    ("", False), ("a.b", False), ("a b", False), ("@a", False),
])
def test_agent_names(s: str, ok: bool) -> None:
    assert is_valid_agent_name(s) is ok


task_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True).filter(
    is_valid_task_id)
names = st.from_regex(r"[A-Za-z0-9_-]{1,32}", fullmatch=True)


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(task_id=task_ids, agent=names)
def test_valid_ids_make_valid_git_branches(task_id: str, agent: str) -> None:
    ref = f"refs/heads/swarm/{agent}/{task_id}"
    assert subprocess.run(["git", "check-ref-format", ref]).returncode == 0, ref


# --- properties -------------------------------------------------------------

verb_words = st.sampled_from(sorted(verbs.VERBS) + ["", "task", "X"])
fields = st.one_of(task_ids, names, st.text(max_size=20), st.sampled_from(["any", "qa", "idle"]))


@st.composite
def verbish_lines(draw: st.DrawFn) -> str:
    """Lines that start with a verb and then anything: the parser's hardest input."""
    parts = [draw(verb_words)] + draw(st.lists(fields, max_size=5))
    sep = draw(st.sampled_from([" ", "  ", "\t", " \n"]))
    return sep.join(parts) + draw(st.text(max_size=30))


@settings(max_examples=800, deadline=None)
@given(line=st.one_of(st.text(max_size=300), verbish_lines()))
def test_parse_never_raises_anything_else(line: str) -> None:
    try:
        result = parse(line)
    except VerbError:
        return
    if result is not None:
        assert verbs.format(result) == line
        assert parse(verbs.format(result)) == result


free_text = st.text(min_size=1, max_size=200).filter(lambda s: verbs.clean_text(s).strip())


@st.composite
def any_verb(draw: st.DrawFn) -> verbs.Verb:
    kind = draw(st.sampled_from(["task", "pair", "text", "hb"]))
    if kind == "task":
        role = draw(st.sampled_from(["any", *verbs.ROLES]))
        return Task(draw(task_ids), role, draw(free_text))
    if kind == "pair":
        cls = draw(st.sampled_from([Claim, Unclaim, Assign, Rejected]))
        return cls(draw(task_ids), draw(names))
    if kind == "text":
        cls = draw(st.sampled_from([Status, Done, Fail, Blocked]))
        return cls(draw(task_ids), draw(names), draw(free_text))
    return Heartbeat(draw(names), draw(st.from_regex(r"[a-z-]{1,32}", fullmatch=True)))


@settings(max_examples=500, deadline=None)
@given(verb=any_verb())
def test_format_then_parse_round_trips(verb: verbs.Verb) -> None:
    line = verbs.format(verb)
    assert len(line) <= MAX_LINE
    parsed = parse(line)
    assert type(parsed) is type(verb)
    # Free text may have been cleaned; everything else is exact, and a second
    # round is a fixed point.
    assert verbs.format(parsed) == line
    for attr in ("task_id", "agent", "role", "status"):
        assert getattr(parsed, attr, None) == getattr(verb, attr, None)


@settings(max_examples=200, deadline=None)
@given(verb=any_verb(), chunk=st.text(min_size=1, max_size=40))
def test_long_free_text_is_truncated_to_fit(verb: verbs.Verb, chunk: str) -> None:
    text = chunk * (MAX_LINE // len(chunk) + 2)
    if isinstance(verb, (Claim, Unclaim, Assign, Rejected, Heartbeat)):
        return
    attr = {Task: "prompt", Status: "text", Done: "summary", Fail: "reason", Blocked: "reason"}
    long_verb = type(verb)(**{**verb.__dict__, attr[type(verb)]: "x" + text})
    line = verbs.format(long_verb)
    assert len(line) <= MAX_LINE
    assert parse(line) is not None
