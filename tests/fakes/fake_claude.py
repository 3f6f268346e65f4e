"""A stand-in for `claude -p --output-format stream-json --verbose [flags] <prompt>`.

Why: the real CLI needs a network, an account and minutes per run; the tests need
each of its output shapes and failure modes on demand, in milliseconds. The shapes
follow /work/shared/claude-cli-facts.md (system/init, assistant messages that repeat
a message.id with the same usage, user tool_result, rate_limit_event, a final
`result` line).

The behaviour is chosen by a directive in the prompt, `[fake:MODE]`, so a task's
prompt drives it end to end; else by the env var FAKE_CLAUDE_MODE; else `success`.
Modes: success, fail, hang, hang-ignore-term, slow:SECONDS[:STEPS], quota,
quota-old, quota-while:PATH (quota while PATH exists, else success: for quota
probes), overflow, deny, api-error, throttle, max-turns, alloc:MB, text, crash,
tokens:N, env, orphan, bigline:MB.

The hang modes and `orphan` fork one grandchild in the same process group (as the
Bash tool would) and write its pid to `fake-child.pid` in the cwd, so tests can
check that nothing is left behind.

Imports are limited to json/os/sys/time/uuid/signal so that it starts fast.
"""
import json
import os
import signal
import sys
import time
import uuid

VERSION = "2.1.245"
NESTED_ERROR = (
    "Error: Claude Code cannot be launched inside another Claude Code session.\n"
    "Nested sessions share runtime resources and will crash all active sessions.\n"
    "To bypass this check, unset the CLAUDECODE environment variable.\n"
)
VERBOSE_ERROR = "Error: When using --print, --output-format=stream-json requires --verbose\n"
VALUE_FLAGS = {
    "--output-format", "--input-format", "--model", "--permission-mode", "--max-turns",
    "--max-budget-usd", "--allowedTools", "--allowed-tools", "--disallowedTools",
    "--disallowed-tools", "--tools", "--system-prompt", "--append-system-prompt",
    "--add-dir", "--session-id", "--mcp-config", "--settings", "-r", "--resume",
}


class Run:
    """One fake session: parsed flags, ids and the stream writer."""

    def __init__(self, argv):
        self.flags = {}
        self.switches = set()
        i = 0
        while i < len(argv) - 1:
            arg = argv[i]
            if arg in VALUE_FLAGS and i + 1 < len(argv) - 1:
                self.flags[arg] = argv[i + 1]
                i += 2
                continue
            self.switches.add(arg)
            i += 1
        self.prompt = argv[-1] if argv else ""
        self.cwd = os.getcwd()
        self.session_id = str(uuid.uuid4())
        self.model = self.flags.get("--model", "claude-sonnet-4-5")
        self.format = self.flags.get("--output-format", "text")
        self.started = time.monotonic()
        self.turns = 0
        self.msg_no = 0
        self.tool_no = 0
        self.usage = {"input_tokens": 0, "output_tokens": 0,
                      "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        self.denials = []

    def emit(self, obj):
        """Write one stream-json line (stream-json only; text/json print at the end)."""
        if self.format != "stream-json":
            return
        obj.setdefault("session_id", self.session_id)
        obj.setdefault("uuid", str(uuid.uuid4()))
        sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
        sys.stdout.flush()

    def init(self):
        self.emit({
            "type": "system", "subtype": "init", "cwd": self.cwd,
            "session_id": self.session_id,
            "tools": ["Task", "Bash", "Glob", "Grep", "Read", "Edit", "Write", "WebFetch"],
            "mcp_servers": [], "model": self.model,
            "permissionMode": self.flags.get("--permission-mode", "default"),
            "slash_commands": ["compact", "cost", "review"],
            "apiKeySource": "ANTHROPIC_API_KEY" if os.environ.get("ANTHROPIC_API_KEY") else "none",
            "claude_code_version": VERSION, "output_style": "default",
            "agents": ["general-purpose"], "skills": [], "plugins": [],
        })

    def assistant(self, blocks, usage=None, repeat=False, error=None, model=None):
        """One API message; `repeat` re-sends it split per block with the same id+usage."""
        self.msg_no += 1
        mid = "msg_%s%02d" % (uuid.uuid4().hex[:20], self.msg_no)
        usage = usage or {"input_tokens": 3, "cache_creation_input_tokens": 120,
                          "cache_read_input_tokens": 14707, "output_tokens": 40}
        for key in self.usage:
            self.usage[key] += usage.get(key, 0)
        parts = [[b] for b in blocks] if repeat and len(blocks) > 1 else [blocks]
        for part in parts:
            msg = {"id": mid, "type": "message", "role": "assistant",
                   "model": model or self.model, "content": part,
                   "stop_reason": None, "stop_sequence": None, "usage": dict(usage)}
            line = {"type": "assistant", "message": msg, "parent_tool_use_id": None}
            if error:
                line["error"] = error
            self.emit(line)
        self.turns += 1

    def tool_use(self, name, tool_input, text=None, usage=None):
        self.tool_no += 1
        tid = "toolu_%s%02d" % (uuid.uuid4().hex[:18], self.tool_no)
        blocks = [{"type": "text", "text": text}] if text else []
        blocks.append({"type": "tool_use", "id": tid, "name": name, "input": tool_input})
        self.assistant(blocks, usage=usage, repeat=True)
        return tid

    def tool_result(self, tid, content, is_error=False):
        self.emit({"type": "user", "message": {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": tid, "content": content, "is_error": is_error}]},
            "parent_tool_use_id": None})

    def cost(self):
        u = self.usage
        return round((u["input_tokens"] * 3 + u["output_tokens"] * 15
                      + u["cache_creation_input_tokens"] * 3.75
                      + u["cache_read_input_tokens"] * 0.3) / 1e6, 6)

    def result(self, subtype="success", is_error=False, text=None, code=0, **extra):
        """Print the final result line (or text/json form) and exit with `code`."""
        ms = int((time.monotonic() - self.started) * 1000)
        cost = extra.pop("total_cost_usd", self.cost())
        u = self.usage
        obj = {"type": "result", "subtype": subtype, "is_error": is_error,
               "duration_ms": ms, "duration_api_ms": max(0, ms - 5), "num_turns": max(1, self.turns),
               "session_id": self.session_id, "total_cost_usd": cost, "usage": dict(u),
               "modelUsage": {self.model: {
                   "inputTokens": u["input_tokens"], "outputTokens": u["output_tokens"],
                   "cacheReadInputTokens": u["cache_read_input_tokens"],
                   "cacheCreationInputTokens": u["cache_creation_input_tokens"],
                   "webSearchRequests": 0, "costUSD": cost, "contextWindow": 200000}},
               "permission_denials": self.denials, "terminal_reason": "completed"}
        if text is not None:
            obj["result"] = text
        obj.update(extra)
        if self.format == "stream-json":
            self.emit(obj)
        elif self.format == "json":
            obj["uuid"] = str(uuid.uuid4())
            sys.stdout.write(json.dumps(obj) + "\n")
        elif text is not None:
            sys.stdout.write(text + "\n")
        sys.stdout.flush()
        sys.exit(code)


def mode_of(prompt):
    """`[fake:MODE]` in the prompt wins over FAKE_CLAUDE_MODE."""
    start = prompt.find("[fake:")
    if start >= 0:
        end = prompt.find("]", start)
        if end > start:
            return prompt[start + 6:end].strip()
    return os.environ.get("FAKE_CLAUDE_MODE", "success").strip() or "success"


def fork_sleeper():
    """A grandchild in our process group, like a Bash tool's long-running command."""
    pid = os.fork()
    if pid == 0:
        try:
            while True:
                time.sleep(3600)
        finally:
            os._exit(0)
    with open("fake-child.pid.tmp", "w") as f:
        f.write(str(pid))
    os.rename("fake-child.pid.tmp", "fake-child.pid")  # readers never see it half-written
    return pid


def do_success(run, text="Wrote fake-output.txt with the requested content.", usages=(None, None)):
    tid = run.tool_use("Write", {"file_path": os.path.join(run.cwd, "fake-output.txt"),
                                 "content": "hello from fake claude\n"},
                       text="I'll create the file now.", usage=usages[0])
    with open("fake-output.txt", "w") as f:
        f.write("hello from fake claude\nprompt: %s\n" % run.prompt[:200])
    run.tool_result(tid, "File created successfully at: %s/fake-output.txt" % run.cwd)
    run.assistant([{"type": "text", "text": text}], usage=usages[1])
    run.result(text=text)


def do_fail(run):
    run.assistant([{"type": "text", "text": "Starting work on the task."}])
    run.result(subtype="error_during_execution", is_error=True, code=1,
               errors=["Error: simulated failure during execution"],
               terminal_reason="error")


def do_hang(run, ignore_term):
    if ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    fork_sleeper()
    while True:
        time.sleep(3600)


def do_slow(run, arg):
    parts = arg.split(":")
    seconds = float(parts[0] or 1)
    steps = int(parts[1]) if len(parts) > 1 else max(3, min(50, int(seconds * 10)))
    for i in range(steps):
        time.sleep(seconds / steps)
        run.assistant([{"type": "text", "text": "Working, step %d of %d." % (i + 1, steps)}])
    do_success(run)


def do_quota(run):
    resets = int(time.time()) + 3 * 3600
    run.emit({"type": "rate_limit_event", "rate_limit_info": {
        "status": "rejected", "resetsAt": resets, "rateLimitType": "five_hour",
        "overageStatus": "rejected", "isUsingOverage": False}})
    text = "You've hit your session limit \u00b7 resets 3:45pm"
    run.assistant([{"type": "text", "text": text}], model="<synthetic>", error="rate_limit",
                  usage={"input_tokens": 0, "output_tokens": 0})
    run.result(is_error=True, text=text, code=1, api_error_status=429, total_cost_usd=0)


def do_quota_old(run):
    text = "Claude AI usage limit reached|%d" % (int(time.time()) + 3600)
    run.assistant([{"type": "text", "text": text}], model="<synthetic>",
                  usage={"input_tokens": 0, "output_tokens": 0})
    run.result(is_error=True, text=text, code=1, total_cost_usd=0)


def do_overflow(run):
    run.assistant([{"type": "text", "text": "Reading the whole repository."}])
    run.assistant([{"type": "text", "text": "Prompt is too long"}], model="<synthetic>",
                  error="invalid_request", usage={"input_tokens": 0, "output_tokens": 0})
    run.result(is_error=True, text="Prompt is too long", code=1, terminal_reason="prompt_too_long")


def do_deny(run):
    path = os.path.join(run.cwd, "x")
    tid = run.tool_use("Write", {"file_path": path, "content": "hi"})
    run.tool_result(tid, "Claude requested permissions to write to %s, but you haven't "
                         "granted it yet." % path, is_error=True)
    run.denials.append({"tool_name": "Write", "tool_use_id": tid,
                        "tool_input": {"file_path": path, "content": "hi"}})
    run.assistant([{"type": "text", "text": "Could not write x."}])
    run.result(text="Could not write x.")


def do_api_error(run):
    text = ('API Error: 529 {"type":"error","error":{"type":"overloaded_error",'
            '"message":"Overloaded"}}')
    run.result(is_error=True, text=text, api_error_status=529, terminal_reason="api_error")


def do_throttle(run):
    text = "API Error: Server is temporarily limiting requests (not your usage limit) \u00b7 Rate limited"
    run.result(is_error=True, text=text, api_error_status=429, terminal_reason="api_error", code=1)


def do_max_turns(run):
    run.assistant([{"type": "text", "text": "Still going."}])
    run.result(subtype="error_max_turns", is_error=True, code=1, errors=[],
               terminal_reason="max_turns")


def do_alloc(run, arg):
    size = int(float(arg) * 1024 * 1024)
    run.assistant([{"type": "text", "text": "Allocating %s MB." % arg}])
    block = b"\x01" * size  # b"x" * n writes every byte, so every page is touched
    do_success(run, text="Allocated %d bytes." % len(block))


def do_text(run):
    for line in ("Working on the task...", "Edited 2 files.", "All done: plain text summary."):
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    sys.exit(0)


def do_crash(run):
    run.assistant([{"type": "text", "text": "About to crash."}])
    sys.stdout.write('{"type":"assistant","message":{"id":"msg_half","content":[{"ty')
    sys.stdout.flush()
    os.abort()


def split_tokens(n):
    usage = {"input_tokens": n // 10, "cache_creation_input_tokens": n // 5,
             "cache_read_input_tokens": n // 2}
    usage["output_tokens"] = n - sum(usage.values())
    return usage


def do_tokens(run, arg):
    n = int(arg)
    do_success(run, text="Used about %d tokens." % n,
               usages=(split_tokens(n // 2), split_tokens(n - n // 2)))


def do_env(run):
    names = sorted(os.environ)
    auth = {k: k in os.environ for k in
            ("CLAUDE_CONFIG_DIR", "ANTHROPIC_API_KEY", "CLAUDE_CODE_OAUTH_TOKEN")}
    try:  # Linux 6.4+: whether this process offers its pages to KSM
        with open("/proc/self/ksm_stat") as f:
            ksm = "ksm_merge_any: yes" in f.read()
    except OSError:
        ksm = None
    dump = json.dumps({"names": names, "auth": auth, "ksm_merge_any": ksm}, sort_keys=True)
    with open("fake-env.json", "w") as f:
        f.write(dump)
    run.assistant([{"type": "text", "text": dump}])
    run.result(text="env " + dump)


def do_orphan(run):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    fork_sleeper()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    do_success(run, text="Started a background job and finished.")


def do_bigline(run, arg):
    size = int(float(arg) * 1024 * 1024)
    run.assistant([{"type": "text", "text": "x" * size}])
    do_success(run)


MODES = {
    "success": lambda run, arg: do_success(run),
    "fail": lambda run, arg: do_fail(run),
    "hang": lambda run, arg: do_hang(run, False),
    "hang-ignore-term": lambda run, arg: do_hang(run, True),
    "slow": do_slow,
    "quota": lambda run, arg: do_quota(run),
    "quota-old": lambda run, arg: do_quota_old(run),
    "quota-while": lambda run, arg: do_quota(run) if os.path.exists(arg) else do_success(run),
    "overflow": lambda run, arg: do_overflow(run),
    "deny": lambda run, arg: do_deny(run),
    "api-error": lambda run, arg: do_api_error(run),
    "throttle": lambda run, arg: do_throttle(run),
    "max-turns": lambda run, arg: do_max_turns(run),
    "alloc": do_alloc,
    "text": lambda run, arg: do_text(run),
    "crash": lambda run, arg: do_crash(run),
    "tokens": do_tokens,
    "env": lambda run, arg: do_env(run),
    "orphan": lambda run, arg: do_orphan(run),
    "bigline": do_bigline,
}


def main(argv):
    if os.environ.get("CLAUDECODE"):
        sys.stderr.write(NESTED_ERROR)
        return 1
    run = Run(argv)
    if run.format == "stream-json" and "--verbose" not in run.switches and (
            "-p" in run.switches or "--print" in run.switches):
        sys.stderr.write(VERBOSE_ERROR)
        return 1
    mode = mode_of(run.prompt)
    name, _, arg = mode.partition(":")
    handler = MODES.get(name)
    if handler is None:
        sys.stderr.write("fake_claude: unknown mode %r\n" % mode)
        return 2
    if name != "text":
        run.init()
    handler(run, arg)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
