"""Claude's stream-json: parse it line by line, classify how a session ended.

Classification. The final ``result`` line is authoritative; texts from other
lines (synthetic assistant messages, plain text, stderr) count only when the run
did not end cleanly, because a model may well *write* "Prompt is too long" in a
successful answer. The same holds for a rejected ``rate_limit_event`` and for
the OOM flag (a tool can be OOM-killed while claude carries on).
Facts: /work/shared/claude-cli-facts.md.

Retriable reasons (the coordinator re-announces these): ``quota`` (after the
probe says quota is back), ``api-error`` (overload, throttle, 5xx), ``killed-*``
(a crash or a kill from outside), ``cancelled`` (our own shutdown). Not
retriable, because a rerun would most likely fail the same way while spending
budget: ``timeout``, ``oom``, ``context-overflow``, ``sandbox-denied``,
``error-max-turns``, ``error-max-budget``, ``exit-N``, ``spawn-failed``.
"""
from __future__ import annotations

import collections
import dataclasses
import datetime
import enum
import json
import re
import signal as signal_mod
from typing import Any, Iterable

LINE_LIMIT = 4 * 1024 * 1024
STDERR_LINE_LIMIT = 64 * 1024
TAIL_CHARS = 4096
STDERR_TAIL_CHARS = 8192
SUMMARY_MAX = 300
STATUS_MAX = 120
DRAIN_TIMEOUT = 2.0
MESSAGE_IDS_KEPT = 256

_CTRL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]+")
_SPACES_RE = re.compile(r"\s+")
_QUOTA_RE = re.compile(
    r"you(?:'|\u2019)ve hit your (?:\w+ )?limit|usage limit reached|credit balance is too low"
    r"|request rejected \(429\)", re.I)
_THROTTLE_RE = re.compile(r"temporarily limiting requests", re.I)
_LIMIT_WORD_RE = re.compile(r"\blimit\b", re.I)
_RESETS_RE = re.compile(r"\bresets?\s+(?:at\s+)?([^\n|\u00b7]{1,40}?)\s*(?:$|[|\u00b7.(])", re.I)
_EPOCH_RE = re.compile(r"usage limit reached\|(\d{9,11})", re.I)
_OVERFLOW_RE = re.compile(
    r"prompt is too long|input length and `?max_tokens`? exceed context limit", re.I)
_OOM_RE = re.compile(r"MemoryError|Cannot allocate memory|JavaScript heap out of memory", re.I)
_QUOTA_ERRORS = {"rate_limit", "billing_error"}


class Outcome(str, enum.Enum):
    DONE = "done"
    FAIL = "fail"
    BLOCKED = "blocked"


RETRIABLE_REASONS = frozenset({"quota", "api-error", "cancelled"})


def is_retriable(reason: str) -> bool:
    """The policy in the module docstring, in one place."""
    return reason in RETRIABLE_REASONS or reason.startswith("killed-")


def one_line(text: str, limit: int) -> str:
    """Text safe for one wire line: control/bidi characters removed, ≤ limit chars."""
    head = text[: limit * 8 + 64]  # a 4 MiB line must not cost a 4 MiB regex pass
    flat = _SPACES_RE.sub(" ", _CTRL_RE.sub(" ", head)).strip()
    if len(flat) <= limit and len(head) == len(text):
        return flat
    return flat[: max(0, limit - 1)].rstrip() + "\u2026"


def _int(value: Any) -> int:
    """Token counts from untrusted JSON: non-negative ints or 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


@dataclasses.dataclass
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0

    @classmethod
    def from_json(cls, obj: Any) -> "Usage":
        if not isinstance(obj, dict):
            return cls()
        return cls(*(_int(obj.get(f.name)) for f in dataclasses.fields(cls)))

    @property
    def total(self) -> int:
        return (self.input_tokens + self.output_tokens
                + self.cache_creation_input_tokens + self.cache_read_input_tokens)

    def add(self, other: "Usage", sign: int = 1) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + sign * getattr(other, f.name))

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class SessionResult:
    outcome: Outcome
    reason: str
    summary: str
    usage: Usage = dataclasses.field(default_factory=Usage)
    cost_usd: float = 0.0
    exit_code: int | None = None
    signal: int | None = None
    duration_s: float = 0.0
    quota: bool = False
    quota_resets_at: str | None = None
    retriable: bool = False
    permission_denials: list[dict] = dataclasses.field(default_factory=list)
    session_id: str | None = None
    partial_output: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["outcome"] = self.outcome.value
        return data


def _epoch_to_iso(value: Any) -> str | None:
    """resetsAt comes as epoch seconds (or ms); anything else is kept as text."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        seconds = value / 1000 if value > 1e11 else value
        try:
            stamp = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
        except (OverflowError, ValueError, OSError):
            return None
        return stamp.isoformat(timespec="seconds")
    return one_line(value, 60) or None if isinstance(value, str) else None


def _resets_from_text(text: str) -> str | None:
    match = _EPOCH_RE.search(text)
    if match:
        return _epoch_to_iso(int(match.group(1)))
    match = _RESETS_RE.search(text)
    return match.group(1).strip() if match else None


def _texts(content: Any) -> Iterable[str]:
    """The text blocks of a message content (string or list of blocks)."""
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for block in content:
            if isinstance(block, dict) and isinstance(block.get("text"), str):
                yield block["text"]


def _strings(value: Any) -> list[str]:
    """The strings of a JSON list (e.g. a result's `errors`); [] for anything else."""
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _tool_label(block: dict, cwd: str | None) -> str:
    """'Write fake-output.txt', 'Bash pytest -q': the tool and its main argument."""
    args = block.get("input") if isinstance(block.get("input"), dict) else {}
    arg = next((args[k] for k in ("file_path", "path", "command", "pattern", "url", "description")
                if isinstance(args.get(k), str)), "")
    if cwd and arg.startswith(cwd.rstrip("/") + "/"):
        arg = arg[len(cwd.rstrip("/")) + 1:]
    return ("%s %s" % (block.get("name", "?"), arg)).strip()


class StreamParser:
    """Incremental reader of `claude -p --output-format stream-json` output.

    Tolerant by design: a line that is not a JSON object is plain text (the
    agent command may not be claude at all, or claude may print text). Keeps
    bounded state only.
    """

    def __init__(self) -> None:
        self.init: dict | None = None
        self.result: dict | None = None
        self.session_id: str | None = None
        self.lines = 0
        self.text_lines = 0
        self.last_text = ""
        self.quota_text: str | None = None
        self.rate_limit_rejected = False
        self.resets_at: str | None = None
        self.overflow_text: str | None = None
        self.assistant_error: str | None = None
        self._tail = ""
        self._stream_usage = Usage()
        self._by_message: collections.OrderedDict[str, Usage] = collections.OrderedDict()

    # ---- feeding -------------------------------------------------------------
    def feed(self, line: str) -> str | None:
        """Take one output line; return a short status text when it is worth forwarding."""
        line = line.rstrip("\r\n")
        if not line.strip():
            return None
        self.lines += 1
        obj = self._json(line)
        if obj is None:
            return self._on_text(line)
        kind = obj.get("type")
        handler = {"system": self._on_system, "assistant": self._on_assistant,
                   "user": self._on_user, "result": self._on_result,
                   "rate_limit_event": self._on_rate_limit}.get(kind if isinstance(kind, str) else "")
        if isinstance(obj.get("session_id"), str):
            self.session_id = obj["session_id"]
        return handler(obj) if handler else None

    @staticmethod
    def _json(line: str) -> dict | None:
        if not line.lstrip().startswith("{"):
            return None
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            return None
        return obj if isinstance(obj, dict) else None

    def _on_text(self, line: str) -> str | None:
        self.text_lines += 1
        self._remember(line)
        self._scan_errors(line)
        return one_line(line, STATUS_MAX) or None

    def _on_system(self, obj: dict) -> str | None:
        subtype = obj.get("subtype")
        if subtype == "init":
            self.init = obj
            return "session started (model %s)" % one_line(str(obj.get("model", "?")), 60)
        if subtype == "compact_boundary":
            return "context compacted"
        if subtype == "api_retry":
            return "API retry"
        return None

    def _on_assistant(self, obj: dict) -> str | None:
        message = obj.get("message") if isinstance(obj.get("message"), dict) else {}
        self._count_usage(message)
        error = obj.get("error") if isinstance(obj.get("error"), str) else None
        synthetic = error is not None or message.get("model") == "<synthetic>"
        if error:
            self.assistant_error = error
        status = None
        for block in message.get("content") if isinstance(message.get("content"), list) else []:
            status = self._on_block(block, synthetic, error) or status
        return status

    def _on_block(self, block: Any, synthetic: bool, error: str | None) -> str | None:
        if not isinstance(block, dict):
            return None
        if block.get("type") == "tool_use":
            return "tool: " + one_line(_tool_label(block, self._cwd()), STATUS_MAX)
        text = block.get("text")
        if block.get("type") != "text" or not isinstance(text, str) or not text.strip():
            return None
        self._remember(text)
        if synthetic:
            self._scan_errors(text, quota_hint=error in _QUOTA_ERRORS)
        return "assistant: " + one_line(text, STATUS_MAX)

    def _on_user(self, obj: dict) -> str | None:
        message = obj.get("message") if isinstance(obj.get("message"), dict) else {}
        content = message.get("content") if isinstance(message.get("content"), list) else []
        for block in content:
            if isinstance(block, dict) and block.get("type") == "tool_result" and block.get("is_error"):
                text = " ".join(_texts(block.get("content")))
                return "tool error: " + one_line(text, STATUS_MAX)
        return None

    def _on_rate_limit(self, obj: dict) -> str | None:
        info = obj.get("rate_limit_info") if isinstance(obj.get("rate_limit_info"), dict) else {}
        if info.get("status") != "rejected":
            return None
        self.rate_limit_rejected = True
        self.resets_at = _epoch_to_iso(info.get("resetsAt")) or self.resets_at  # structured wins
        return "rate limit rejected (resets %s)" % (self.resets_at or "unknown")

    def _on_result(self, obj: dict) -> str | None:
        self.result = obj
        if obj.get("terminal_reason") == "prompt_too_long":
            self.overflow_text = self.overflow_text or "Prompt is too long"
        if not obj.get("is_error"):
            return None  # a successful answer may quote error texts; only errors count
        texts = [obj["result"]] if isinstance(obj.get("result"), str) else []
        texts += _strings(obj.get("errors"))
        for text in texts:
            self._scan_errors(text, quota_hint=self._is_limit_429(obj, text))
        return None

    # ---- detection -----------------------------------------------------------
    @staticmethod
    def _is_limit_429(obj: dict, text: str) -> bool:
        return (obj.get("api_error_status") == 429 and bool(_LIMIT_WORD_RE.search(text))
                and not _THROTTLE_RE.search(text))

    def _scan_errors(self, text: str, quota_hint: bool = False) -> None:
        """Record quota / overflow wordings; the throttle wording is neither."""
        if _OVERFLOW_RE.search(text):
            self.overflow_text = self.overflow_text or text
        if _THROTTLE_RE.search(text):
            return
        if quota_hint or _QUOTA_RE.search(text):
            self.quota_text = text
            self.resets_at = self.resets_at or _resets_from_text(text)

    def _count_usage(self, message: dict) -> None:
        """Count each message.id once; a repeat replaces the earlier figures."""
        if "usage" not in message:
            return
        usage = Usage.from_json(message.get("usage"))
        mid = message.get("id") if isinstance(message.get("id"), str) else None
        if mid is None:
            self._stream_usage.add(usage)
            return
        previous = self._by_message.pop(mid, None)
        if previous is not None:
            self._stream_usage.add(previous, -1)
        self._by_message[mid] = usage
        self._stream_usage.add(usage)
        while len(self._by_message) > MESSAGE_IDS_KEPT:
            self._by_message.popitem(last=False)

    def _remember(self, text: str) -> None:
        self.last_text = text
        self._tail = (self._tail + "\n" + text if self._tail else text)[-TAIL_CHARS:]

    def _cwd(self) -> str | None:
        cwd = (self.init or {}).get("cwd")
        return cwd if isinstance(cwd, str) else None

    # ---- results -------------------------------------------------------------
    @property
    def usage(self) -> Usage:
        """The final result's usage when there is one, else the per-message sum."""
        if self.result is not None and isinstance(self.result.get("usage"), dict):
            return Usage.from_json(self.result["usage"])
        return dataclasses.replace(self._stream_usage)

    @property
    def cost_usd(self) -> float:
        cost = (self.result or {}).get("total_cost_usd")
        ok = isinstance(cost, (int, float)) and not isinstance(cost, bool) and cost >= 0
        return float(cost) if ok else 0.0

    @property
    def is_error(self) -> bool:
        return bool((self.result or {}).get("is_error"))

    @property
    def permission_denials(self) -> list[dict]:
        denials = (self.result or {}).get("permission_denials")
        return [d for d in denials if isinstance(d, dict)] if isinstance(denials, list) else []

    @property
    def result_text(self) -> str | None:
        text = (self.result or {}).get("result")
        return text if isinstance(text, str) else None

    @property
    def partial_output(self) -> str:
        return self._tail


# ---- classification ------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Exit:
    """Everything classify() knows besides the parser."""
    exit_code: int | None
    signal: int | None
    timed_out: bool
    stderr_tail: str
    oom: bool
    cancelled: bool
    duration_s: float

    @property
    def failed(self) -> bool:
        return self.signal is not None or self.exit_code != 0


_Verdict = tuple[Outcome, str, str]


def _last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _error_line(text: str) -> str:
    """The last stderr line that mentions an error (CLIs print hints after it), else the last."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return next((ln for ln in reversed(lines) if "error" in ln.lower()), lines[-1] if lines else "")


def _rule_stop(p: StreamParser, x: _Exit, unclean: bool) -> _Verdict | None:
    if x.cancelled:
        return Outcome.FAIL, "cancelled", "cancelled after %.1fs" % x.duration_s
    if x.timed_out:
        return Outcome.FAIL, "timeout", "timed out after %.1fs" % x.duration_s
    return None


def _rule_oom(p: StreamParser, x: _Exit, unclean: bool) -> _Verdict | None:
    if unclean and (x.oom or (x.failed and _OOM_RE.search(x.stderr_tail))):
        detail = _last_line(x.stderr_tail) if _OOM_RE.search(x.stderr_tail) else "killed by the OOM killer"
        return Outcome.FAIL, "oom", "out of memory: " + detail
    return None


def _rule_quota(p: StreamParser, x: _Exit, unclean: bool) -> _Verdict | None:
    if unclean and (p.quota_text or p.rate_limit_rejected or _QUOTA_RE.search(x.stderr_tail)):
        text = p.quota_text or _last_line(x.stderr_tail) or "rate limit rejected"
        return Outcome.FAIL, "quota", "quota exhausted: " + text
    return None


def _rule_overflow(p: StreamParser, x: _Exit, unclean: bool) -> _Verdict | None:
    if unclean and (p.overflow_text or _OVERFLOW_RE.search(x.stderr_tail)):
        return Outcome.FAIL, "context-overflow", "context overflow: " + (p.overflow_text or "Prompt is too long")
    return None


def _rule_denied(p: StreamParser, x: _Exit, unclean: bool) -> _Verdict | None:
    denials = p.permission_denials
    if not denials:
        return None
    tools = sorted({str(d.get("tool_name", "?")) for d in denials})
    return Outcome.BLOCKED, "sandbox-denied", "permission denied: %s (%d denial%s)" % (
        ", ".join(tools), len(denials), "" if len(denials) == 1 else "s")


def _rule_result_error(p: StreamParser, x: _Exit, unclean: bool) -> _Verdict | None:
    if not p.is_error:
        return None
    result = p.result or {}
    subtype = str(result.get("subtype", ""))
    text = p.result_text or " ".join(_strings(result.get("errors"))) or subtype
    special = {"error_max_turns": "error-max-turns", "error_max_budget_usd": "error-max-budget"}
    if subtype in special:
        return Outcome.FAIL, special[subtype], "%s after %s turns" % (subtype, result.get("num_turns", "?"))
    if result.get("api_error_status") is not None or result.get("terminal_reason") == "api_error" \
            or subtype == "success" or not x.failed:
        return Outcome.FAIL, "api-error", "API error: " + text
    return None


def _rule_exit(p: StreamParser, x: _Exit, unclean: bool) -> _Verdict | None:
    detail = _error_line(x.stderr_tail) or p.result_text or p.last_text
    if x.signal is not None:
        name = _signal_name(x.signal)
        return Outcome.FAIL, "killed-" + name, ("killed by %s: %s" % (name, detail)).rstrip(": ")
    if x.exit_code is None:
        return Outcome.FAIL, "exit-unknown", "exit status unknown"
    if x.exit_code != 0:
        return Outcome.FAIL, "exit-%d" % x.exit_code, ("exited with code %d: %s" % (x.exit_code, detail)).rstrip(": ")
    return Outcome.DONE, "", p.result_text or p.last_text or "completed"


_RULES = (_rule_stop, _rule_oom, _rule_quota, _rule_overflow, _rule_denied,
          _rule_result_error, _rule_exit)


def _signal_name(signum: int) -> str:
    try:
        return signal_mod.Signals(signum).name
    except ValueError:
        return "SIG%d" % signum


def classify(parser: StreamParser, *, exit_code: int | None, signal: int | None, timed_out: bool,
             stderr_tail: str, oom: bool = False, cancelled: bool = False,
             duration_s: float = 0.0) -> SessionResult:
    """Decide the outcome; precedence is the order of _RULES (see module docstring)."""
    x = _Exit(exit_code, signal, timed_out, stderr_tail, oom, cancelled, duration_s)
    unclean = x.failed or parser.is_error or timed_out or cancelled
    outcome, reason, summary = next(v for v in (rule(parser, x, unclean) for rule in _RULES) if v)
    quota = reason == "quota"
    return SessionResult(
        outcome=outcome, reason=reason, summary=one_line(summary, SUMMARY_MAX),
        usage=parser.usage, cost_usd=parser.cost_usd, exit_code=exit_code, signal=signal,
        duration_s=round(duration_s, 3), quota=quota,
        quota_resets_at=parser.resets_at if quota else None, retriable=is_retriable(reason),
        permission_denials=parser.permission_denials, session_id=parser.session_id,
        partial_output=parser.partial_output)


def spawn_failed(error: str, duration_s: float = 0.0) -> SessionResult:
    """The result for a command that never started (bad path, exec or preexec failure)."""
    return SessionResult(outcome=Outcome.FAIL, reason="spawn-failed",
                         summary=one_line("spawn failed: " + error, SUMMARY_MAX),
                         duration_s=round(duration_s, 3))
