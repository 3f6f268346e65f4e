"""Agent workspaces: directory, .gitignore, git clone, identity, CLAUDE.md, context.md.

This is the spawner's file half. It runs inside the daemon at boot (so key
generation, file writes and clones happen in parallel across daemons, in the
daemon's own cgroup) and in the supervisor for teardown.

A workspace the swarm creates carries a marker file; teardown removes only
directories with that marker, only when asked with ``confirm=True``. An existing
workspace is reused, never clobbered: its identity and ``context.md`` survive a
restart, which is how a restarted daemon learns of an interrupted task.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from .agentchat.identity import Identity
from .state import write_text_atomic

MARKER = ".agentctl-swarm"
SECURITY_IGNORES = (
    "# agentctl-swarm: never commit secrets or agent state",
    "*.key", "*.pem", "*.p12", "id_rsa*", "id_ed25519*", ".env", ".env.*",
    ".agentchat/", ".claude-config/", ".secrets/", ".tmp/", MARKER,
)
_CONTEXT_STATE = re.compile(r"<!-- agentctl-swarm-state: (\{.*?\}) -->")


class WorkspaceError(Exception):
    """A workspace could not be prepared."""


@dataclass
class WorkspaceSpec:
    """What the daemon needs to prepare its workspace (sent by the supervisor)."""

    name: str
    role: str
    path: str
    channels: list[str]
    repo: str | None = None
    instructions: str = ""
    swarm_id: str = ""

    @property
    def root(self) -> Path:
        return Path(self.path)

    @property
    def identity_path(self) -> Path:
        return self.root / ".agentchat" / "identities" / f"{self.name}.json"

    @property
    def config_dir(self) -> Path:
        """The agent CLI's own configuration (CLAUDE_CONFIG_DIR), private to this agent."""
        return self.root / ".claude-config"

    @property
    def tmp_dir(self) -> Path:
        return self.root / ".tmp"

    @property
    def context_path(self) -> Path:
        return self.root / "context.md"


@dataclass
class ContextState:
    """The machine-readable part of context.md."""

    state: str = "idle"
    task_id: str | None = None
    started: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def prepare(spec: WorkspaceSpec) -> Identity:
    """Create or reuse the workspace; return the agent's identity."""
    created = _make_dir(spec)
    if created:
        write_text_atomic(spec.root / ".gitignore", "\n".join(SECURITY_IGNORES) + "\n", durable=False)
        if spec.repo:
            _clone(spec)
    for path in (spec.config_dir, spec.tmp_dir):
        path.mkdir(mode=0o700, exist_ok=True)
    identity = _identity(spec)
    _refresh(spec.root / "CLAUDE.md", claude_md(spec))
    if not spec.context_path.exists():
        write_context(spec, ContextState(), "No task yet.")
    return identity


def _refresh(path: Path, text: str) -> None:
    """Rewrite a generated file only when its text changed (every restart reads it)."""
    try:
        if not path.is_symlink() and path.read_text(encoding="utf-8") == text:
            return  # (a session may plant a symlink: that is always replaced)
    except (OSError, UnicodeDecodeError):
        pass
    write_text_atomic(path, text, durable=False)


def _make_dir(spec: WorkspaceSpec) -> bool:
    """Create the workspace (True) or accept an existing one (False)."""
    try:
        spec.root.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        spec.root.mkdir(mode=0o700)
    except FileExistsError:
        if not spec.root.is_dir() or spec.root.is_symlink():
            raise WorkspaceError(f"{spec.root}: exists and is not a directory") from None
        return False
    marker = {"created_by": "agentctl-swarm", "name": spec.name, "swarm": spec.swarm_id,
              "created": now_iso()}
    # Not fsync'd: a marker lost to a power cut makes the sweep leave the workspace alone.
    write_text_atomic(spec.root / MARKER, json.dumps(marker) + "\n", durable=False)
    return True


def _clone(spec: WorkspaceSpec) -> None:
    """Clone ``repo`` into the fresh workspace, keeping our .gitignore's protection."""
    tmp = spec.root / ".clone-tmp"
    git(spec.root, "clone", "--quiet", "--no-checkout", "--", spec.repo or "", str(tmp))
    os.rename(tmp / ".git", spec.root / ".git")
    shutil.rmtree(tmp)
    git(spec.root, "checkout", "--quiet", "-f", "HEAD")
    exclude = spec.root / ".git" / "info" / "exclude"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    with open(exclude, "a", encoding="utf-8") as fh:
        fh.write("\n" + "\n".join(SECURITY_IGNORES) + "\n")


# A session can write .git/hooks and .git/config: git run for the daemon must not
# execute what it planted there.
_GIT_SAFE = ("-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false")


def git(root: Path, *args: str, wrap: Callable[[list[str]], list[str]] | None = None) -> None:
    """Run git in ``root`` with a minimal environment (HOME is the workspace), hooks off;
    ``wrap`` turns the argv into a confined one (bwrap) when sessions are confined that way."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(root),
           "GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_NOSYSTEM": "1", "LANG": "C.UTF-8"}
    argv = ["git", *_GIT_SAFE, "-C", str(root), *args]
    try:
        subprocess.run(wrap(argv) if wrap else argv, check=True, capture_output=True, text=True,
                       env=env, timeout=600)
    except FileNotFoundError:
        raise WorkspaceError("git is not installed") from None
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or "").strip().splitlines()[-1:] or ["failed"]
        raise WorkspaceError(f"git {args[0]} failed: {detail[0]}") from None
    except subprocess.TimeoutExpired:
        raise WorkspaceError(f"git {args[0]} timed out") from None


def is_git_repo(root: Path) -> bool:
    return (root / ".git").is_dir()


def _identity(spec: WorkspaceSpec) -> Identity:
    if spec.identity_path.exists():
        return Identity.load(spec.identity_path)
    identity = Identity.generate(spec.name)
    identity.save(spec.identity_path)
    return identity


def claude_md(spec: WorkspaceSpec) -> str:
    channels = ", ".join(spec.channels)
    text = f"""# {spec.name}

You are **{spec.name}**, a `{spec.role}` agent in an agentctl-swarm fleet.

## Constraints
- Work only inside this workspace: `{spec.root}`. Other agents' workspaces, the
  user's home directory and the swarm's own state are off limits (and enforced).
- Never write secrets, keys or tokens into files, commits, logs or messages.
- Your daemon speaks for you on agentchat: channels {channels}. Finish your task
  with a short summary as your final answer; the daemon reports DONE or FAIL.
- Commit your work on the current branch if this is a git repository; do not push.

## Role: {spec.role}
"""
    return text + (spec.instructions.strip() + "\n" if spec.instructions else "")


def write_context(spec: WorkspaceSpec, state: ContextState, body: str) -> None:
    """Rewrite context.md atomically: a state comment for the daemon, then prose."""
    meta = {"state": state.state, "task_id": state.task_id, "started": state.started,
            **state.extra}
    text = (f"# Context for {spec.name}\n\n"
            f"<!-- agentctl-swarm-state: {json.dumps(meta)} -->\n\n{body.rstrip()}\n")
    write_text_atomic(spec.context_path, text, durable=False)  # a daemon crash, not a power cut


def read_context(spec: WorkspaceSpec) -> ContextState:
    """The state recorded in context.md; idle when absent or unreadable."""
    try:
        text = spec.context_path.read_text(encoding="utf-8", errors="replace")[:65536]
    except OSError:
        return ContextState()
    match = _CONTEXT_STATE.search(text)
    if not match:
        return ContextState()
    try:
        meta = json.loads(match.group(1))
    except ValueError:
        return ContextState()
    if not isinstance(meta, dict):
        return ContextState()
    task = meta.get("task_id")
    return ContextState(state=str(meta.get("state", "idle")),
                        task_id=task if isinstance(task, str) else None,
                        started=meta.get("started") if isinstance(meta.get("started"), str) else None)


def created_by_swarm(root: Path) -> bool:
    try:
        marker = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("created_by") == "agentctl-swarm"


def swarm_workspaces(base: Path, swarm_id: str) -> list[Path]:
    """Workspaces under ``base`` that this swarm (``swarm_id``) created, per their markers."""
    found = []
    try:
        entries = list(base.iterdir())
    except OSError:
        return []
    for root in entries:
        try:
            marker = json.loads((root / MARKER).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(marker, dict) and marker.get("created_by") == "agentctl-swarm" \
                and marker.get("swarm") == swarm_id and not root.is_symlink():
            found.append(root)
    return found


def teardown(root: Path, confirm: bool = False) -> bool:
    """Delete a workspace the swarm created. Refuses without ``confirm=True``."""
    if not confirm:
        raise WorkspaceError(f"{root}: teardown needs confirm=True")
    if root.is_symlink() or not root.is_dir() or not created_by_swarm(root):
        return False
    shutil.rmtree(root)
    return True
