"""The daemon's active half: one approved task, from promotion to demotion.

promoting: write context.md, create the task branch, build the session's
environment and confinement; active: run the session, forward throttled STATUS
lines; demoting: report DONE / FAIL / BLOCKED on the channel, record the summary
in context.md and the tokens with the supervisor; then the daemon is idle again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import session as sessions
from . import verbs, workspace
from .spawner import LaunchPlan, apply_in_child
from .workspace import ContextState

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger("agentctl_swarm.daemon")


class TaskRunner:
    """Runs one task for a daemon; ``run`` always ends with the daemon idle."""

    def __init__(self, daemon: "Daemon", task_id: str, prompt: str, *, probe: bool = False) -> None:
        self.d = daemon
        self.task_id = task_id
        self.prompt = prompt
        self.probe = probe  # a quota probe: no channel lines, no context.md
        self.session: sessions.Session | None = None
        self.started = workspace.now_iso()
        self._done = asyncio.Event()

    def _extra(self, event: str) -> dict[str, str]:
        return {"task": self.task_id, "event": event}

    async def run(self) -> None:
        from .daemon import Status
        d = self.d
        d._set_status(Status.PROMOTING)
        try:
            result = await self._run_session()
        except Exception as exc:  # noqa: BLE001 - any failure is reported as FAIL, never lost
            log.exception("task %s could not run", self.task_id, extra=self._extra("session"))
            result = sessions.spawn_failed(str(exc))
        d._set_status(Status.DEMOTING)
        self._report(result)
        d.claimed = None
        d.runner = None
        d._set_status(Status.IDLE)
        self._done.set()

    async def _run_session(self) -> sessions.SessionResult:
        from .daemon import Status
        d, spec = self.d, self.d.spec
        assert spec is not None
        requested = d.boot.get("sandbox")
        if requested and requested.get("kind") == "unavailable":
            return dataclasses.replace(sessions.spawn_failed(f"sandbox: {requested.get('error')}"),
                                       reason="sandbox-unavailable")
        from .isolation import resolve
        sandbox = resolve(requested, spec.root, spec.tmp_dir)  # once per task
        if not self.probe:
            workspace.write_context(spec, ContextState("active", self.task_id, self.started),
                                    f"## Current task {self.task_id}\n\nStarted {self.started}.\n\n"
                                    f"### Prompt\n\n{self.prompt}\n")
            self._branch(sandbox)
        _place_file_grants(spec.root, d.boot.get("grants", []))
        oom_before = self._oom_kills()
        self.session = self._make_session(sandbox)
        pid = await self.session.start()
        if pid is not None:
            d.send_ipc({"t": "session_started", "task_id": self.task_id, "pid": pid})
            d._set_status(Status.ACTIVE)
            log.info("session for %s started (pid %s)", self.task_id, pid, extra=self._extra("session-start"))
        result = await self.session.wait()
        if result.signal == signal.SIGKILL and self._oom_kills() > oom_before:
            result = dataclasses.replace(result, outcome=sessions.Outcome.FAIL, reason="oom",
                                         retriable=sessions.is_retriable("oom"))
        return result

    def _make_session(self, sandbox: dict[str, Any] | None) -> sessions.Session:
        spec, boot = self.d.spec, self.d.boot
        assert spec is not None
        env = sessions.clean_env(os.environ, home=spec.root, config_dir=spec.config_dir,
                                 tmpdir=spec.tmp_dir, grants=_read_grants(boot.get("grants", [])),
                                 extra=boot.get("agent_env", {}))
        argv = list(boot["agent_command"]) + [self.prompt]
        # merge_pages=False: a daemon's KSM opt-in (merge-pages) survives exec, and a session,
        # where a model runs code, must not share pages with anything (dedup side channels).
        plan = LaunchPlan(name=f"{spec.name}/{self.task_id}", supervisor_pid=os.getpid(),
                          new_session=False, sandbox=sandbox, cgroup=_session_limit(boot.get("cgroup")),
                          merge_pages=False)
        if plan.sandbox and plan.sandbox.get("kind") == "bwrap":
            from .isolation import bwrap_argv_from_spec
            argv = bwrap_argv_from_spec(plan.sandbox, argv, cwd=str(spec.root))
            plan.sandbox = None
        return sessions.Session(
            argv, cwd=spec.root, env=env,
            max_duration=float(boot.get("max_task_duration", 1800)),
            grace=float(boot.get("shutdown_grace", 10.0)),
            preexec_fn=lambda: apply_in_child(plan),
            on_status=self._on_status, on_output=self._on_output,
            status_interval=float(boot.get("status_interval", 10.0)))

    def _branch(self, sandbox: dict[str, Any] | None) -> None:
        """Work on branch swarm/<agent>/<task> when the workspace is a git repo."""
        spec = self.d.spec
        assert spec is not None
        if not workspace.is_git_repo(spec.root) or not verbs.is_valid_task_id(self.task_id):
            return
        branch = f"swarm/{spec.name}/{self.task_id}"
        from .isolation import bwrap_argv_from_spec
        wrap = None
        if sandbox and sandbox.get("kind") == "bwrap":  # the daemon itself is not confined then
            wrap = lambda argv: bwrap_argv_from_spec(sandbox, argv, cwd=str(spec.root))  # noqa: E731
        try:
            workspace.git(spec.root, "checkout", "-q", "-B", branch, wrap=wrap)
        except workspace.WorkspaceError as exc:
            log.warning("could not create branch %s: %s", branch, exc, extra=self._extra("git"))

    def _oom_kills(self) -> int:
        spec = self.d.boot.get("cgroup")
        if not spec:
            return 0
        from .system.cgroups import AgentCgroup
        try:
            return AgentCgroup.from_spec(self.d.name, spec).oom_kills()
        except (OSError, ValueError, KeyError):
            return 0

    def _on_status(self, text: str) -> None:
        if self.probe:
            return
        line = verbs.format(verbs.Status(self.task_id, self.d.name, text or "working"))
        self.d.say(line)

    def _on_output(self, stream: str, line: str) -> None:
        log.info("%s: %s", stream, line[:2000], extra=self._extra("session-output"))

    def _report(self, result: sessions.SessionResult) -> None:
        d, spec = self.d, self.d.spec
        assert spec is not None
        name, reason = d.name, result.reason or "failed"
        if self.probe:
            self._send_ended(result)
            return
        if result.outcome is sessions.Outcome.DONE:
            line = verbs.Done(self.task_id, name, result.summary or "done")
        elif result.outcome is sessions.Outcome.BLOCKED:
            line = verbs.Blocked(self.task_id, name, reason)
        else:
            line = verbs.Fail(self.task_id, name, reason)
        d.say(verbs.format(line))
        body = (f"## Last task {self.task_id}\n\nStarted {self.started}, finished "
                f"{workspace.now_iso()}: **{result.outcome.value}** {reason if result.reason else ''}\n\n"
                f"### Summary\n\n{result.summary}\n\n### Partial output\n\n```\n"
                f"{result.partial_output[-4000:]}\n```\n")
        workspace.write_context(spec, ContextState(extra={"last_task": self.task_id,
                                                          "last_outcome": result.outcome.value}), body)
        self._send_ended(result)

    def _send_ended(self, result: sessions.SessionResult) -> None:
        d = self.d
        d.send_ipc({"t": "session_ended", "task_id": self.task_id, "outcome": result.outcome.value,
                    "reason": result.reason, "summary": result.summary[:1000],
                    "tokens": result.usage.total, "cost_usd": float(result.cost_usd),
                    "quota": bool(result.quota), "retriable": bool(result.retriable),
                    "usage": result.usage.to_dict()})
        log.info("task %s ended: %s %s", self.task_id, result.outcome.value, result.reason,
                 extra=self._extra("session-end"))

    async def cancel(self, grace: float) -> None:
        """Stop the session (shutdown or cancel), giving it ``grace`` seconds to save."""
        if self.session is not None:
            self.session.terminate(grace)
        await self._done.wait()


def _place_file_grants(root: Path, grants: list[dict[str, Any]]) -> None:
    """Secret files granted with a ``path``: a symlink in the workspace to the file.

    The sandbox allows reading that one file (isolation.sandbox_spec), so the link
    works inside the session while the file's directory stays out of reach.
    """
    for grant in grants:
        rel, target = grant.get("path"), grant.get("file")
        if not rel or not target or rel.startswith("/") or ".." in Path(rel).parts:
            continue
        try:
            _link_beneath(root, Path(rel).parts, target)
        except OSError as exc:
            log.warning("secret %s not placed at %s: %s", grant.get("name", "?"), rel,
                        exc.strerror or exc, extra={"event": "secret"})


def _link_beneath(root: Path, parts: tuple[str, ...], target: str) -> None:
    """Make root/<parts> a symlink to ``target`` without following any symlink a session
    may have planted on the way (each directory is opened O_NOFOLLOW from the last)."""
    fd = os.open(root, os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            try:
                os.mkdir(part, 0o700, dir_fd=fd)
            except FileExistsError:
                pass
            inner = os.open(part, os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = inner
        tmp = f".{parts[-1]}.tmp"
        try:
            os.unlink(tmp, dir_fd=fd)
        except FileNotFoundError:
            pass
        os.symlink(target, tmp, dir_fd=fd)
        os.replace(tmp, parts[-1], src_dir_fd=fd, dst_dir_fd=fd)  # replaces a planted entry itself
    finally:
        os.close(fd)


def _session_limit(spec: dict[str, Any] | None) -> dict[str, Any] | None:
    """The RLIMIT_AS spec to apply in the session (cgroups are inherited from the daemon)."""
    return spec if spec and spec.get("enforcement") == "rlimit" else None


def _read_grants(grants: list[dict[str, Any]]) -> dict[str, str]:
    """Environment secrets granted to this agent: {"env": VAR, "file": PATH}."""
    env: dict[str, str] = {}
    for grant in grants:
        if grant.get("env") and grant.get("file"):
            try:
                with open(grant["file"], encoding="utf-8") as fh:
                    env[grant["env"]] = fh.read().strip()
            except OSError as exc:
                log.warning("secret %s unreadable: %s", grant.get("name", "?"), exc.strerror,
                            extra={"event": "secret"})
    return env
