"""Load and validate ``swarm.yaml`` and the per-role files; durations, sizes, reload diff.

Design note. The config file is trusted (it is the owner's), but it is typed by
a person, so every value is checked at load and a bad one is refused with one
line naming the file, the key, what was expected and what was found; nothing
starts on a bad file.  Defaults are written in YAML form in :data:`DEFAULTS`
and go through the same validators as the file, so a default can never be of
another shape than a configured value.  The nested sections ``agentchat:`` and
``agent:`` are flattened to dotted keys (``agentchat.server``) before
validation; the dotted names are also what error messages, the reload diff and
the role files use.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import reprlib
import string
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from .errors import ConfigError
from .verbs import ROLES, is_valid_agent_name

ENV_VAR = "AGENTCTL_SWARM_CONFIG"
MAX_COUNT = 1000
MAX_DURATION = 365 * 86400.0
MAX_FILE_BYTES = 1 << 20
COORDINATORS = ("builtin", "external")
SPAWN_MODES = ("fork-server", "exec")
SANDBOXES = ("auto", "landlock", "bwrap", "off")

DEFAULTS: Mapping[str, Any] = MappingProxyType({
    "count": None,
    "roles": None,
    "max-active": 5,
    "token-budget": None,
    "heartbeat-interval": "30s",
    "heartbeat-misses": 3,
    "max-task-duration": "30m",
    "workspace-base": "~/dev/claude",
    "identity-template": "swarm-{role}-{index:03d}",
    "persist": False,
    "repo": None,
    "agentchat.server": "embedded",
    "agentchat.channels": ["#agents"],
    "agentchat.rate-limit": 1.0,
    "agent.command": ["claude", "-p", "--output-format", "stream-json", "--verbose"],
    "agent.memory-limit": None,
    "agent.cpu-weight": None,
    "agent.env": {},
    "secrets": [],
    "coordinator": "builtin",
    "spawn": "fork-server",
    "merge-pages": False,
    "sandbox": "auto",
    "sandbox-allow-read": [],
    "quota-probe-interval": "5m",
    "quota-probe-prompt": "Reply with the single word OK.",
    "start-timeout": "60s",
    "status-interval": "10s",
    "shutdown-grace": "10s",
    "health-sample-interval": "60s",
})
"""Every key with its default, in the form a person writes in ``swarm.yaml``."""

DEFAULT_COUNT = 3
"""Daemons started when neither ``count`` nor ``roles`` is configured."""

SECTIONS = ("agentchat", "agent")
ROLE_FILE_KEYS = (
    "agent.command", "agent.memory-limit", "agent.cpu-weight", "agent.env",
    "max-task-duration", "instructions",
)

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h|d)", re.ASCII)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)", re.IGNORECASE | re.ASCII)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_CHANNEL = re.compile(r"#[A-Za-z0-9_-]{1,31}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SECRET_ENV = re.compile(r"[A-Z_][A-Z0-9_]*")
_SECRET_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_CONTROL = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlist = _REPR.maxdict = _REPR.maxtuple = 4


class _Invalid(Exception):
    """Raised by a validator with what it expected; the caller adds file and key."""

    def __init__(self, expected: str, value: Any, key: str | None = None) -> None:
        super().__init__(expected)
        self.expected, self.value, self.key = expected, value, key


# --------------------------------------------------------------------------
# Durations and sizes (public: the CLI and the tests use them too)


def parse_duration(v: Any) -> float:
    """Seconds from ``30``, ``"30s"``, ``"5m"``, ``"1h30m"``, ``"250ms"`` or ``"2d"``."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ValueError(f"expected a duration like 30s, 5m, 1h or seconds, got {_REPR.repr(v)}")
    try:
        seconds = _duration_from_text(v) if isinstance(v, str) else float(v)
    except OverflowError:
        seconds = float("inf")
    if not (0 <= seconds < float("inf")):
        raise ValueError(f"expected a finite, non-negative duration, got {_REPR.repr(v)}")
    return seconds


def _duration_from_text(text: str) -> float:
    s = text.strip().lower()
    try:
        return float(s) if s and not s[-1].isalpha() else _sum_units(s)
    except ValueError:
        raise ValueError(
            f"expected a duration like 30s, 5m, 1h or seconds, got {_REPR.repr(text)}"
        ) from None


def _sum_units(s: str) -> float:
    parts = _DURATION.findall(s)
    if not parts or "".join(n + u for n, u in parts) != s:
        raise ValueError(s)
    return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


def format_duration(seconds: float) -> str:
    """The short form of a duration: ``30s``, ``5m``, ``1h30m``, ``1.5s``."""
    if seconds != int(seconds) or seconds < 60:
        return f"{seconds:g}s"
    out, rest = "", int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            out, rest = out + f"{rest // size}{unit}", rest % size
    return out


def parse_size(v: Any) -> int:
    """Bytes from ``1048576``, ``"512M"``, ``"2G"``, ``"1.5GiB"`` (binary units)."""
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise ValueError(f"expected a size like 512M, 2G or bytes, got {_REPR.repr(v)}")
    if isinstance(v, int):
        size = v
    else:
        m = _SIZE.fullmatch(v.strip())
        if not m or (m.group(3) and not m.group(2) and m.group(3).lower() != "b"):
            raise ValueError(f"expected a size like 512M, 2G or bytes, got {_REPR.repr(v)}")
        size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    if not 0 < size < 1 << 62:
        raise ValueError(f"expected a positive size, got {_REPR.repr(v)}")
    return size


def format_size(size: int) -> str:
    """The short form of a byte count: ``512M``, ``2G``, or plain bytes."""
    for unit in ("T", "G", "M", "K"):
        scale = _SIZE_UNITS[unit.lower()]
        if size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


# --------------------------------------------------------------------------
# The typed config


@dataclass(frozen=True)
class Secret:
    """One opt-in secret: a file exposed read-only in the workspace, or an env var."""

    name: str
    file: Path
    path: str | None = None
    env: str | None = None
    agents: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()

    def granted_to(self, agent: str, role: str) -> bool:
        """True if this secret reaches ``agent`` (by name or by role)."""
        return agent in self.agents or role in self.roles


@dataclass(frozen=True)
class RoleSettings:
    """What a session of one role runs with, after the role file's overrides."""

    command: tuple[str, ...]
    memory_limit: int | None
    cpu_weight: int | None
    env: Mapping[str, str]
    max_task_duration: float
    instructions: str


@dataclass(frozen=True)
class SwarmConfig:
    """The validated config. Python names are the YAML keys with ``_`` for ``-`` and ``.``."""

    count: int
    roles: Mapping[str, int]
    max_active: int
    token_budget: int | None
    heartbeat_interval: float
    heartbeat_misses: int
    max_task_duration: float
    workspace_base: Path
    identity_template: str
    persist: bool
    repo: str | None
    agentchat_server: str
    agentchat_channels: tuple[str, ...]
    agentchat_rate_limit: float
    agent_command: tuple[str, ...]
    agent_memory_limit: int | None
    agent_cpu_weight: int | None
    agent_env: Mapping[str, str]
    secrets: tuple[Secret, ...]
    coordinator: str
    spawn: str
    merge_pages: bool
    sandbox: str
    sandbox_allow_read: tuple[Path, ...]
    quota_probe_interval: float
    quota_probe_prompt: str
    start_timeout: float
    status_interval: float
    shutdown_grace: float
    health_sample_interval: float
    source: Path | None = None
    role_overrides: Mapping[str, Mapping[str, Any]] = field(
        default_factory=lambda: MappingProxyType({})
    )

    @property
    def work_channel(self) -> str:
        """The first channel: where tasks, claims and heartbeats go."""
        return self.agentchat_channels[0]

    def for_role(self, role: str) -> RoleSettings:
        """The session settings of ``role``: global values, then the role file's."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        o = self.role_overrides.get(role, {})
        return RoleSettings(
            command=o.get("agent_command", self.agent_command),
            memory_limit=o.get("agent_memory_limit", self.agent_memory_limit),
            cpu_weight=o.get("agent_cpu_weight", self.agent_cpu_weight),
            env=MappingProxyType({**self.agent_env, **o.get("agent_env", {})}),
            max_task_duration=o.get("max_task_duration", self.max_task_duration),
            instructions=o.get("instructions", ""),
        )

    def slot_plan(self, n: int) -> list[tuple[str, int]]:
        """(role, 1-based index) of the first ``n`` slots: role counts in order, then general."""
        if n < 0:
            raise ValueError(f"slot count must be >= 0, got {n}")
        plan = [(r, i) for r in ROLES for i in range(1, self.roles.get(r, 0) + 1)]
        extra = self.roles.get("general", 0)
        plan += [("general", extra + i) for i in range(1, n - len(plan) + 1)]
        return plan[:n]

    def agent_name(self, role: str, index: int) -> str:
        """The agentchat name of slot (role, index), from ``identity-template``."""
        name = _render_template(self.identity_template, role, index)
        if not is_valid_agent_name(name):
            raise ConfigError(
                f"{_label(self.source)}: identity-template: {self.identity_template!r} gives "
                f"{name!r} for {role} #{index}, not a valid name (1-32 of [A-Za-z0-9_-])"
            )
        return name

    def secrets_for(self, agent: str, role: str) -> tuple[Secret, ...]:
        """The secrets granted to one agent."""
        return tuple(s for s in self.secrets if s.granted_to(agent, role))


# --------------------------------------------------------------------------
# Validators: each takes (value, ctx) and returns the typed value or raises _Invalid


@dataclass(frozen=True)
class _Ctx:
    home: Path
    base_dir: Path


Check = Callable[[Any, _Ctx], Any]


def _int(lo: int, hi: int, nullable: bool = False) -> Check:
    what = f"an integer {lo}..{hi}" + (" or null" if nullable else "")

    def check(v: Any, ctx: _Ctx) -> int | None:
        if v is None and nullable:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise _Invalid(what, v)
        return v
    return check


def _duration(v: Any, ctx: _Ctx) -> float:
    try:
        seconds = parse_duration(v)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= MAX_DURATION:
        raise _Invalid("a positive duration like 30s, 5m, 1h or seconds (at most 365d)", v)
    return seconds


def _size(v: Any, ctx: _Ctx) -> int | None:
    if v is None:
        return None
    try:
        return parse_size(v)
    except ValueError:
        raise _Invalid("a size like 512M, 2G, bytes, or null", v) from None


def _bool(v: Any, ctx: _Ctx) -> bool:
    if not isinstance(v, bool):
        raise _Invalid("true or false", v)
    return v


def _choice(*options: str) -> Check:
    def check(v: Any, ctx: _Ctx) -> str:
        if v not in options or not isinstance(v, str):
            raise _Invalid(" or ".join(repr(o) for o in options), v)
        return v
    return check


def _text(max_len: int, empty_ok: bool = False) -> Check:
    def check(v: Any, ctx: _Ctx) -> str:
        if not isinstance(v, str) or len(v) > max_len or (not v.strip() and not empty_ok):
            kind = "a" if empty_ok else "a non-empty"
            raise _Invalid(f"{kind} string of at most {max_len} characters", v)
        if "\x00" in v or _has_surrogate(v):
            raise _Invalid("text without NUL or invalid characters", v)
        return v
    return check


def _has_surrogate(v: str) -> bool:
    return any("\ud800" <= c <= "\udfff" for c in v)


def _rate(v: Any, ctx: _Ctx) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1000:
        raise _Invalid("messages per second, a number > 0 and <= 1000", v)
    return float(v)


def _path(v: Any, ctx: _Ctx) -> Path:
    """An absolute path or one under ``~/`` (expanded against the swarm's home)."""
    if not isinstance(v, str) or not v or _CONTROL.search(v) or len(v) > 4096:
        raise _Invalid("an absolute path or ~/path", v)
    if v == "~" or v.startswith("~/"):
        return ctx.home / v[2:]
    if not v.startswith("/"):
        raise _Invalid("an absolute path or ~/path", v)
    return Path(v)


def _file(v: Any, ctx: _Ctx) -> Path:
    """A readable regular file; relative paths are relative to the config file."""
    if isinstance(v, str) and v and not v.startswith(("/", "~")) and not _CONTROL.search(v):
        v = str(ctx.base_dir / v)
    p = _path(v, ctx)
    if not p.is_file():
        raise _Invalid("an existing regular file", v)
    return p


def _paths(v: Any, ctx: _Ctx) -> tuple[Path, ...]:
    items = _list(v, "a list of absolute paths")
    return tuple(_item(_path, p, ctx, f"[{i}]") for i, p in enumerate(items))


def _list(v: Any, what: str, empty_ok: bool = True) -> list[Any]:
    if not isinstance(v, list) or (not v and not empty_ok):
        raise _Invalid(what, v)
    return v


def _item(check: Check, v: Any, ctx: _Ctx, suffix: str) -> Any:
    """Validate one element of a list or mapping, remembering where it was."""
    try:
        return check(v, ctx)
    except _Invalid as exc:
        raise _Invalid(exc.expected, exc.value, suffix + (exc.key or "")) from None


def _count(v: Any, ctx: _Ctx) -> int | None:
    return None if v is None else _int(0, MAX_COUNT)(v, ctx)


def _roles(v: Any, ctx: _Ctx) -> dict[str, int] | None:
    if v is None:
        return None
    if not isinstance(v, dict):
        raise _Invalid(f"a mapping of role to count (roles: {', '.join(ROLES)})", v)
    out: dict[str, int] = {}
    for role, n in v.items():
        if not isinstance(role, str) or role not in ROLES:
            raise _Invalid(f"a role ({', '.join(ROLES)}){_hint(role, ROLES)}", role, f".{role}")
        out[role] = _item(_int(0, MAX_COUNT), n, ctx, f".{role}")
    return out


def _template(v: Any, ctx: _Ctx) -> str:
    what = "a template using {role} and {index} that gives a name of 1-32 of [A-Za-z0-9_-]"
    if not isinstance(v, str) or len(v) > 64:
        raise _Invalid(what, v)
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(v)
                  if f is not None]
    except ValueError:
        raise _Invalid(what, v) from None
    if not all(_safe_field(*f) for f in fields) or {f[0] for f in fields} != {"role", "index"}:
        raise _Invalid(what, v)
    if not all(is_valid_agent_name(_render_template(v, role, index))
               for role in ROLES for index in (1, MAX_COUNT)):
        raise _Invalid(what, v)
    return v


def _safe_field(name: str, spec: str | None, conv: str | None) -> bool:
    """Only plain {role}/{index} with a short spec: no attribute access, no huge widths."""
    spec = spec or ""
    return (name in ("role", "index") and conv is None and "{" not in spec
            and not re.search(r"\d{3,}", spec))


def _render_template(template: str, role: str, index: int) -> str:
    try:
        return template.format(role=role, index=index)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return ""


def _repo(v: Any, ctx: _Ctx) -> str | None:
    """A git URL or a path; never something git could take for an option."""
    if v is None:
        return None
    if not isinstance(v, str) or not v or len(v) > 4096 or v.startswith("-") \
            or _CONTROL.search(v) or any(c.isspace() for c in v):
        raise _Invalid("a git URL or path (no spaces, not starting with '-') or null", v)
    if v == "~" or v.startswith("~/"):
        return str(ctx.home / v[2:])
    return v


def _server(v: Any, ctx: _Ctx) -> str:
    what = "'embedded' or a ws:// or wss:// URL"
    if v == "embedded":
        return v
    if not isinstance(v, str) or _CONTROL.search(v) or any(c.isspace() for c in v):
        raise _Invalid(what, v)
    try:
        url = urllib.parse.urlsplit(v)
        url.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise _Invalid(what, v) from None
    if url.scheme not in ("ws", "wss") or not url.hostname:
        raise _Invalid(what, v)
    return v


def _channels(v: Any, ctx: _Ctx) -> tuple[str, ...]:
    what = "a non-empty list of channels ('#' + 1-31 of [A-Za-z0-9_-])"
    items = _list(v, what, empty_ok=False)
    for i, ch in enumerate(items):
        if not isinstance(ch, str) or not _CHANNEL.fullmatch(ch):
            raise _Invalid("a channel: '#' + 1-31 of [A-Za-z0-9_-]", ch, f"[{i}]")
    if len(set(items)) != len(items):
        raise _Invalid("channels without duplicates", v)
    return tuple(items)


def _command(v: Any, ctx: _Ctx) -> tuple[str, ...]:
    what = "a non-empty list of non-empty strings (the argv, prompt appended)"
    items = _list(v, what, empty_ok=False)
    if not all(isinstance(a, str) and a and "\x00" not in a and not _has_surrogate(a)
               for a in items):
        raise _Invalid(what, v)
    return tuple(items)


def _env(v: Any, ctx: _Ctx) -> Mapping[str, str]:
    if not isinstance(v, dict):
        raise _Invalid("a mapping of environment variable to string", v)
    out: dict[str, str] = {}
    for name, value in v.items():
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            raise _Invalid("an environment variable name [A-Za-z_][A-Za-z0-9_]*", name)
        if isinstance(value, bool) or not isinstance(value, (str, int, float)) \
                or "\x00" in str(value) or _has_surrogate(str(value)):
            raise _Invalid("a string value", value, f".{name}")
        out[name] = str(value)
    return MappingProxyType(out)


_SECRET_KEYS = ("name", "file", "path", "env", "agents", "roles")


def _secrets(v: Any, ctx: _Ctx) -> tuple[Secret, ...]:
    items = _list(v, "a list of secret entries")
    out = tuple(_item(_secret, s, ctx, f"[{i}]") for i, s in enumerate(items))
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise _Invalid("secrets with distinct names", sorted(names))
    return out


def _secret(v: Any, ctx: _Ctx) -> Secret:
    if not isinstance(v, dict):
        raise _Invalid("a mapping with name, file, path or env, agents and/or roles", v)
    for key in v:
        if key not in _SECRET_KEYS:
            raise _Invalid(f"one of {', '.join(_SECRET_KEYS)}{_hint(key, _SECRET_KEYS)}", key,
                           f".{key}")
    name = v.get("name")
    if not isinstance(name, str) or not _SECRET_NAME.fullmatch(name):
        raise _Invalid("a name of 1-64 of [A-Za-z0-9_.-]", name, ".name")
    if ("path" in v) == ("env" in v):
        raise _Invalid("exactly one of path: or env:", sorted(k for k in v if isinstance(k, str)))
    if not (v.get("agents") or v.get("roles")):
        raise _Invalid("agents: [names] and/or roles: [roles] to grant it to",
                       v.get("agents"), ".agents")
    return Secret(
        name=name,
        file=_item(_file, v.get("file"), ctx, ".file"),
        path=_item(_secret_path, v["path"], ctx, ".path") if "path" in v else None,
        env=_item(_secret_env, v["env"], ctx, ".env") if "env" in v else None,
        agents=_item(_agent_list, v.get("agents", []), ctx, ".agents"),
        roles=_item(_role_list, v.get("roles", []), ctx, ".roles"),
    )


def _secret_path(v: Any, ctx: _Ctx) -> str:
    what = "a relative path inside the workspace, without '..'"
    if not isinstance(v, str) or not v or v.startswith(("/", "~")) or _CONTROL.search(v) \
            or len(v) > 1024:
        raise _Invalid(what, v)
    parts = v.split("/")
    if ".." in parts or all(p in ("", ".") for p in parts):
        raise _Invalid(what, v)
    return v


def _secret_env(v: Any, ctx: _Ctx) -> str:
    if not isinstance(v, str) or not _SECRET_ENV.fullmatch(v):
        raise _Invalid("an environment variable name [A-Z_][A-Z0-9_]*", v)
    return v


def _agent_list(v: Any, ctx: _Ctx) -> tuple[str, ...]:
    items = _list(v, "a list of agent names")
    for i, a in enumerate(items):
        if not is_valid_agent_name(a):
            raise _Invalid("an agent name (1-32 of [A-Za-z0-9_-])", a, f"[{i}]")
    return tuple(items)


def _role_list(v: Any, ctx: _Ctx) -> tuple[str, ...]:
    items = _list(v, "a list of roles")
    for i, r in enumerate(items):
        if not isinstance(r, str) or r not in ROLES:
            raise _Invalid(f"a role ({', '.join(ROLES)}){_hint(r, ROLES)}", r, f"[{i}]")
    return tuple(items)


CHECKS: Mapping[str, Check] = MappingProxyType({
    "count": _count,
    "roles": _roles,
    "max-active": _int(0, MAX_COUNT),
    "token-budget": _int(0, 1 << 62, nullable=True),
    "heartbeat-interval": _duration,
    "heartbeat-misses": _int(1, 1000),
    "max-task-duration": _duration,
    "workspace-base": _path,
    "identity-template": _template,
    "persist": _bool,
    "repo": _repo,
    "agentchat.server": _server,
    "agentchat.channels": _channels,
    "agentchat.rate-limit": _rate,
    "agent.command": _command,
    "agent.memory-limit": _size,
    "agent.cpu-weight": _int(1, 10000, nullable=True),
    "agent.env": _env,
    "secrets": _secrets,
    "coordinator": _choice(*COORDINATORS),
    "spawn": _choice(*SPAWN_MODES),
    "merge-pages": _bool,
    "sandbox": _choice(*SANDBOXES),
    "sandbox-allow-read": _paths,
    "quota-probe-interval": _duration,
    "quota-probe-prompt": _text(1000),
    "start-timeout": _duration,
    "status-interval": _duration,
    "shutdown-grace": _duration,
    "health-sample-interval": _duration,
    "instructions": _text(65536, empty_ok=True),
})
"""The validator of each key (``instructions`` is for role files only)."""


def _attr(key: str) -> str:
    return key.replace("-", "_").replace(".", "_")


# --------------------------------------------------------------------------
# Loading


def config_path(explicit: Path | str | None, env: Mapping[str, str], home: Path) -> Path | None:
    """Which file to read: ``--config``, then ``$AGENTCTL_SWARM_CONFIG``, then the default.

    Returns ``None`` when only the default applies and it does not exist.
    """
    if explicit is not None and str(explicit) != "":
        return Path(explicit).expanduser()
    if env.get(ENV_VAR):
        return Path(env[ENV_VAR]).expanduser()
    default = default_config_file(home)
    return default if default.exists() else None


def default_config_file(home: Path) -> Path:
    """``<home>/.agentctl/swarm.yaml``."""
    return home / ".agentctl" / "swarm.yaml"


def roles_dir(home: Path) -> Path:
    """``<home>/.agentctl/roles``: one ``<role>.yaml`` per overridden role."""
    return home / ".agentctl" / "roles"


def load_config(path: Path | str | None = None, *, env: Mapping[str, str] = os.environ,
                home: Path | None = None) -> SwarmConfig:
    """Load, validate and return the config; :class:`ConfigError` on any bad value."""
    home = Path(home) if home is not None else Path(env.get("HOME") or Path.home())
    source = config_path(path, env, home)
    raw = _read_yaml(source) if source is not None else {}
    base_dir = source.parent if source is not None else home
    cfg = config_from_mapping(raw, source=source, home=home, base_dir=base_dir)
    overrides = {role: o for role in ROLES
                 if (o := _load_role_file(roles_dir(home) / f"{role}.yaml", home))}
    return dataclasses.replace(cfg, role_overrides=MappingProxyType(overrides))


def default_config(home: Path) -> SwarmConfig:
    """The config with every default and no role overrides (no files read)."""
    return config_from_mapping({}, home=home)


def _read_yaml(path: Path) -> dict[Any, Any]:
    """Read a YAML mapping with ``safe_load``; an empty file is an empty mapping."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_FILE_BYTES} bytes, not a config file")
    try:
        doc = yaml.safe_load(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: {_yaml_problem(exc)}") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top, "
                          f"got {type(doc).__name__}")
    return doc


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or "invalid YAML"
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}invalid YAML: {problem}"


def config_from_mapping(raw: Mapping[Any, Any], *, source: Path | None = None,
                        home: Path, base_dir: Path | None = None) -> SwarmConfig:
    """Validate an already-parsed mapping (the body of ``swarm.yaml``)."""
    label = _label(source)
    ctx = _Ctx(home=home, base_dir=base_dir or home)
    flat = _flatten(raw, label, allowed=tuple(k for k in DEFAULTS))
    values = {key: _check(label, key, flat.get(key, default), ctx)
              for key, default in DEFAULTS.items()}
    values["count"], values["roles"] = _resolve_counts(label, values["count"], values["roles"])
    fields = {_attr(k): v for k, v in values.items()}
    return SwarmConfig(**fields, source=source)


def _label(source: Path | None) -> str:
    return str(source) if source is not None else "<defaults>"


def _flatten(raw: Mapping[Any, Any], label: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    """``{"agent": {"command": x}}`` → ``{"agent.command": x}``; unknown keys are errors."""
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise ConfigError(f"{label}: expected string keys, got {_REPR.repr(key)}")
        if key in SECTIONS and any(k.startswith(key + ".") for k in allowed):
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{label}: {key}: expected a mapping, got {_REPR.repr(value)}")
            flat.update(_flatten({f"{key}.{k}" if isinstance(k, str) else k: v
                                  for k, v in value.items()}, label, allowed))
        elif key in allowed:
            flat[key] = value
        else:
            raise ConfigError(f"{label}: {_key_text(key)}: unknown key{_hint(key, allowed)}")
    return flat


def _key_text(key: str) -> str:
    """A key as typed when it is plain, else its repr (no escape codes reach a terminal)."""
    return key if re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", key) else _REPR.repr(key)


def _hint(key: Any, known: tuple[str, ...] | Any) -> str:
    if not isinstance(key, str):
        return ""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check(label: str, key: str, value: Any, ctx: _Ctx) -> Any:
    try:
        return CHECKS[key](value, ctx)
    except _Invalid as exc:
        where = key + (exc.key or "")
        raise ConfigError(f"{label}: {where}: expected {exc.expected}, got {_REPR.repr(exc.value)}"
                          ) from None


def _resolve_counts(label: str, count: int | None,
                    roles: dict[str, int] | None) -> tuple[int, Mapping[str, int]]:
    """Apply the rules: roles' sum is the default count; any surplus is general."""
    given = dict(roles or {})
    total = sum(given.values())
    if count is None:
        count = total if roles is not None else DEFAULT_COUNT
    if count < total:
        raise ConfigError(f"{label}: count: expected at least the sum of roles ({total}), "
                          f"got {count}")
    resolved = {r: given.get(r, 0) for r in ROLES}
    resolved["general"] += count - total
    return count, MappingProxyType(resolved)


def _load_role_file(path: Path, home: Path) -> Mapping[str, Any]:
    """The validated overrides of one role file, keyed by ``SwarmConfig`` attribute."""
    if not path.exists():
        return {}
    raw = _read_yaml(path)
    flat = _flatten(raw, str(path), allowed=ROLE_FILE_KEYS)
    ctx = _Ctx(home=home, base_dir=path.parent)
    return MappingProxyType({_attr(k): _check(str(path), k, v, ctx) for k, v in flat.items()})


def with_overrides(cfg: SwarmConfig, **changes: Any) -> SwarmConfig:
    """A copy with command-line overrides (``count=N``), validated like the file."""
    if "count" in changes:
        try:
            changes["count"] = _int(0, MAX_COUNT)(changes["count"], _Ctx(Path("/"), Path("/")))
        except _Invalid as exc:
            raise ConfigError(f"--count: expected {exc.expected}, got {_REPR.repr(exc.value)}"
                              ) from None
    return dataclasses.replace(cfg, **changes)


# --------------------------------------------------------------------------
# Reload diff


def diff_configs(old: SwarmConfig, new: SwarmConfig) -> list[str]:
    """What changed, one short item per key (``max-active 5->10``); secrets by name only."""
    changes = [_diff_item(key, getattr(old, _attr(key)), getattr(new, _attr(key)))
               for key in DEFAULTS]
    changes += _diff_roles(old, new)
    return [c for c in changes if c]


def _diff_item(key: str, old: Any, new: Any) -> str | None:
    if old == new:
        return None
    if key == "secrets":
        return "secrets " + _diff_names({s.name: s for s in old}, {s.name: s for s in new})
    if key == "agent.env":
        return "agent.env " + _diff_names(old, new)
    return f"{key} {_show(key, old)}->{_show(key, new)}"


def _diff_names(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """Names added, removed or changed; never the values (they may be sensitive)."""
    parts = [f"+{k}" for k in new if k not in old] + [f"-{k}" for k in old if k not in new]
    parts += [f"~{k}" for k in new if k in old and old[k] != new[k]]
    return "changed (" + ", ".join(sorted(parts, key=lambda p: p[1:])) + ")"


def _show(key: str, value: Any) -> str:
    if value is None:
        return "unlimited" if key == "token-budget" else "none"
    if CHECKS.get(key) is _duration:
        return format_duration(value)
    if key == "agent.memory-limit":
        return format_size(value)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, Mapping):
        return ",".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, tuple):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


def _diff_roles(old: SwarmConfig, new: SwarmConfig) -> list[str]:
    out = []
    for role in ROLES:
        a, b = old.role_overrides.get(role, {}), new.role_overrides.get(role, {})
        if a == b:
            continue
        for key in ROLE_FILE_KEYS:
            x, y = a.get(_attr(key)), b.get(_attr(key))
            if x == y:
                continue
            if key in ("instructions", "agent.env"):
                out.append(f"roles/{role}.yaml {key} changed")
            else:
                out.append(f"roles/{role}.yaml {key} {_show(key, x)}->{_show(key, y)}")
    return out
