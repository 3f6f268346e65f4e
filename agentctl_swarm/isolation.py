"""The supervisor's side of confinement: which sandbox, which paths, which secrets.

``system/sandbox.py`` knows how to confine a process (Landlock or bubblewrap).
This module decides, per agent, what the confinement allows and which secrets
the agent is granted, and turns that into a JSON spec the daemon carries to the
moment a session is spawned (``spawner.apply_in_child`` or a bwrap argv).

``sandbox: auto`` on a machine that offers no confinement runs sessions
unconfined after a loud warning; ``landlock`` or ``bwrap`` that cannot be applied
makes every session refuse to start, with the reason, while the swarm itself runs.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .system import sandbox
from .system.journal import log_fields

if TYPE_CHECKING:
    from .config import SwarmConfig

log = logging.getLogger("agentctl_swarm.isolation")


class Isolation:
    """The confinement in force for this swarm, and each agent's grants."""

    def __init__(self, config: "SwarmConfig", kind: sandbox.SandboxKind | None, error: str = "") -> None:
        self.config = config
        self.kind = kind
        self.error = error
        self._ro_cache: dict[tuple[str, tuple[str, ...]], tuple[list[str], str | None]] = {}
        self.rule_paths = sandbox.PathHandles()  # for daemon_ruleset, one per daemon start

    @classmethod
    def detect(cls, config: "SwarmConfig") -> "Isolation":
        try:
            kind = sandbox.choose(config.sandbox)
        except sandbox.SandboxError as exc:
            log.error("sandbox %s cannot be applied: %s; sessions will refuse to start",
                      config.sandbox, exc, extra=log_fields(event="sandbox"))
            return cls(config, None, str(exc))
        if kind is sandbox.SandboxKind.NONE and config.sandbox == "auto":
            log.warning("NO SANDBOX: this machine offers neither Landlock nor bubblewrap; agent "
                        "sessions run unconfined with the supervisor user's rights",
                        extra=log_fields(event="sandbox"))
        return cls(config, kind)

    @property
    def description(self) -> str:
        if self.kind is None:
            return f"unavailable ({self.config.sandbox}): {self.error}"
        return sandbox.describe(self.kind)

    def sandbox_spec(self, name: str, role: str) -> dict[str, Any] | None:
        """What a daemon needs to confine its sessions; None when sandbox is off.

        The paths are resolved by the daemon at session time (``resolve``), when
        its workspace exists.
        """
        if self.kind is None:
            return {"kind": "unavailable", "error": self.error}
        if self.kind is sandbox.SandboxKind.NONE:
            return None
        command = self.config.for_role(role).command
        extra = [str(p) for p in self.config.sandbox_allow_read]
        # The agent command itself: a script given by absolute path is part of it.
        extra += [arg for arg in command[1:] if arg.startswith("/") and Path(arg).is_file()]
        extra += [str(s.file) for s in self.config.secrets_for(name, role) if s.path]
        read_only, checked_for = self._read_only(command[0], tuple(extra))
        return {"kind": self.kind.value, "program": command[0], "extra_read": extra,
                "read_only": read_only, "read_only_checked_for": checked_for}

    def _read_only(self, program: str, extra: tuple[str, ...]) -> tuple[list[str], str | None]:
        """The read-only grants, and the workspace parent they were checked against (None
        if the check failed: each session then fails it with the reason). Computed once
        per (program, extra paths), not once per daemon: ~160 paths to resolve."""
        key = (program, extra)
        if key not in self._ro_cache:
            paths = list(sandbox.read_only_paths(
                self.config.workspace_base, agent_command=program, extra_read=extra))
            parent: str | None = os.path.realpath(self.config.workspace_base)
            try:
                sandbox.check_read_only(paths, parent)
            except sandbox.SandboxError:
                parent = None
            self._ro_cache[key] = (paths, parent)
        return self._ro_cache[key]

    def env_grants(self, name: str, role: str) -> list[dict[str, str]]:
        """Secrets granted to one agent: env vars filled from files, files shown in the workspace."""
        grants = []
        for secret in self.config.secrets_for(name, role):
            grant = {"name": secret.name, "file": str(secret.file)}
            if secret.env:
                grant["env"] = secret.env
            if secret.path:
                grant["path"] = secret.path
            grants.append(grant)
        return grants


def resolve(spec: dict[str, Any] | None, workspace: Path, tmpdir: Path) -> dict[str, Any] | None:
    """In the daemon, before a session: add the concrete policy to the spec."""
    if not spec or spec.get("kind") not in ("landlock", "bwrap"):
        return spec
    policy = sandbox.session_policy(workspace, tmpdir, agent_command=spec["program"],
                                    extra_read=spec.get("extra_read", ()),
                                    read_only=spec.get("read_only"), checked=_checked(spec))
    return {**spec, "policy": {"read_write": list(policy.read_write),
                               "read_only": list(policy.read_only)}}


def _checked(spec: dict[str, Any]) -> tuple[str, frozenset[str]] | None:
    """What the supervisor already verified of the spec's read-only grants."""
    parent = spec.get("read_only_checked_for")
    if not parent or not spec.get("read_only"):
        return None
    return parent, frozenset(spec["read_only"])


def daemon_ruleset(spec: dict[str, Any] | None, workspaces: Path,
                   grants: list[dict[str, str]], handles: sandbox.PathHandles | None = None) -> int | None:
    """The Landlock ruleset of a daemon under ``workspaces``, without its own workspace;
    None unless its sessions use Landlock. A descriptor, not yet enforced.

    The daemon adds its workspace and enters it (``confine_daemon``). The daemon gets
    the session's grants plus read access to the package (lazy imports) and to the
    secret files it hands to its sessions; its sessions then nest their own, stricter
    domain inside this one. ``handles``: see ``sandbox.PathHandles``."""
    policy = _daemon_policy(spec, workspaces, grants)
    return None if policy is None else sandbox.prepare_landlock(policy, handles=handles)


def daemon_rulesets(spec: dict[str, Any] | None, workspaces: Path, grants: list[dict[str, str]],
                    handles: sandbox.PathHandles | None = None) -> dict[str, int]:
    """What the supervisor hands a daemon it starts, by role: ``"shared"``, the layer all
    daemons under ``workspaces`` share (a ``dup`` of the one ``handles`` keep for their
    generation), and ``"ruleset"``, the daemon's own layer without its workspace
    (``sandbox.split_layers``); {} unless its sessions use Landlock. The daemon adds
    its workspace to its own layer and enters both (``confine_daemon``).

    A single ruleset was ~165 rules (133 of them ``/etc``'s entries, one by one, so that
    its secrets stay out) and ~0.7 ms of the supervisor's time per daemon; the own layer
    is ~10 (0.16 ms). Without ``handles`` (nothing to keep a shared layer in), or where the
    workspaces' directory cannot be had, one whole ruleset as ``daemon_ruleset`` builds it."""
    if handles is None:
        ruleset = daemon_ruleset(spec, workspaces, grants)
        return {} if ruleset is None else {"ruleset": ruleset}
    # The same for every daemon of a role (~0.3 ms each: ~170 paths checked and resolved),
    # so worked out once per generation of handles, keyed by all of its inputs.
    key = json.dumps(["daemon policy", spec, str(workspaces), grants], sort_keys=True)
    policy = handles.derived(key, lambda: _daemon_policy(spec, workspaces, grants))
    if policy is None:
        return {}
    try:
        workspaces.mkdir(mode=0o700, parents=True, exist_ok=True)  # as workspace.prepare makes it
        shared, own = handles.shared_layer(policy, str(workspaces))
    except (sandbox.SandboxError, OSError):
        return {"ruleset": sandbox.prepare_landlock(policy, handles=handles)}
    fds = {"shared": os.dup(shared)}
    try:
        fds["ruleset"] = sandbox.prepare_landlock(own, handles=handles)
    except BaseException:
        os.close(fds["shared"])
        raise
    return fds


def _daemon_policy(spec: dict[str, Any] | None, workspaces: Path,
                   grants: list[dict[str, str]]) -> sandbox.SandboxPolicy | None:
    if not spec or spec.get("kind") != "landlock":
        return None
    import agentctl_swarm
    extra = [str(Path(agentctl_swarm.__file__).parent)] + [g["file"] for g in grants if g.get("file")]
    read_only = list(spec.get("read_only") or sandbox.read_only_paths(
        workspaces, agent_command=spec["program"], extra_read=spec.get("extra_read", ())))
    return sandbox.shared_policy(read_only + [p for p in extra if Path(p).exists()], workspaces,
                                 _checked(spec))


def confine_daemon(spec: dict[str, Any] | None, workspace: Path, tmpdir: Path,
                   grants: list[dict[str, str]], ruleset_fd: int | None = None,
                   shared_fd: int | None = None) -> str:
    """Landlock the daemon itself after boot; returns what is in force ("landlock"/"none").

    Only with Landlock sessions: bubblewrap cannot start inside a Landlock domain
    (no mounts). ``ruleset_fd`` is the ruleset the supervisor passed (``daemon_ruleset``,
    or the own layer of ``daemon_rulesets`` with ``shared_fd`` its shared layer), or None
    to build one here; they are closed in any case. The shared layer allows all of the
    workspaces' directory, so it is entered only if the workspace and the tmp are in it,
    and only after the own layer is complete: no failure leaves the daemon in it alone.
    """
    try:
        if not spec or spec.get("kind") != "landlock":
            return "none"
        if shared_fd is not None and not _in_base(workspace, tmpdir):
            os.close(shared_fd)
            shared_fd = None
            if ruleset_fd is not None:  # an own layer, only half of the confinement: rebuild
                os.close(ruleset_fd)
                ruleset_fd = None
        if ruleset_fd is None:
            ruleset_fd = daemon_ruleset(spec, workspace.parent, grants)
        assert ruleset_fd is not None
        sandbox.add_landlock_rules(ruleset_fd, read_write=sandbox.own_grants(workspace, tmpdir))
        if shared_fd is not None:
            sandbox.restrict_self(shared_fd)
        sandbox.restrict_self(ruleset_fd)
        return "landlock"
    finally:
        for fd in (ruleset_fd, shared_fd):
            if fd is not None:
                os.close(fd)


def _in_base(workspace: Path, tmpdir: Path) -> bool:
    """Whether the workspace and the tmp both really lie in the workspaces' directory."""
    base = Path(os.path.realpath(workspace.parent))
    return all(sandbox.contains(base, Path(os.path.realpath(p))) for p in (workspace, tmpdir))


def policy_from_spec(spec: dict[str, Any]) -> sandbox.SandboxPolicy:
    policy = spec["policy"]
    return sandbox.SandboxPolicy(read_write=tuple(policy["read_write"]),
                                 read_only=tuple(policy["read_only"]))


def apply_sandbox_spec(spec: dict[str, Any]) -> None:
    """In the child, before exec: confine it as the spec says."""
    if spec.get("kind") == "landlock":
        sandbox.apply_landlock(policy_from_spec(spec))
    elif spec.get("kind") == "unavailable":
        raise sandbox.SandboxError(str(spec.get("error", "sandbox unavailable")))


def bwrap_argv_from_spec(spec: dict[str, Any], argv: list[str], *, cwd: str) -> list[str]:
    return sandbox.bwrap_argv(policy_from_spec(spec), argv, cwd=cwd)
