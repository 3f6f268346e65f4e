"""Config loading and validation: real files under a throwaway home."""

from __future__ import annotations

import tempfile
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentctl_swarm import config as C
from agentctl_swarm.config import (
    ConfigError, SwarmConfig, config_path, diff_configs, format_duration, load_config,
    parse_duration, parse_size, with_overrides,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "packaging"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    (tmp_path / ".agentctl" / "roles").mkdir(parents=True)
    return tmp_path


def write(home: Path, text: str, name: str = "swarm.yaml") -> Path:
    path = home / ".agentctl" / name
    path.write_text(textwrap.dedent(text))
    return path


def load(home: Path, text: str | None = None) -> SwarmConfig:
    if text is not None:
        write(home, text)
    return load_config(env={}, home=home)


def error_of(home: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(home, text)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- defaults and file discovery --------------------------------------------

def test_no_file_means_defaults(home: Path) -> None:
    cfg = load(home)
    assert cfg.source is None
    assert cfg.max_active == 5 and cfg.token_budget is None and cfg.persist is False
    assert cfg.heartbeat_interval == 30 and cfg.heartbeat_misses == 3
    assert cfg.max_task_duration == 1800
    assert cfg.workspace_base == home / "dev" / "claude"
    assert cfg.agentchat_server == "embedded" and cfg.agentchat_channels == ("#agents",)
    assert cfg.work_channel == "#agents"
    assert cfg.agent_command == ("claude", "-p", "--output-format", "stream-json", "--verbose")
    assert (cfg.coordinator, cfg.spawn, cfg.sandbox) == ("builtin", "fork-server", "auto")
    assert (cfg.start_timeout, cfg.status_interval, cfg.shutdown_grace) == (60, 10, 10)
    assert cfg.quota_probe_interval == 300 and cfg.health_sample_interval == 60
    assert cfg.count == C.DEFAULT_COUNT
    assert cfg == C.default_config(home)


def test_empty_file_means_defaults(home: Path) -> None:
    path = write(home, "# nothing here\n")
    cfg = load_config(env={}, home=home)
    assert cfg.source == path
    assert dataclass_values(cfg) == dataclass_values(load_config(env={}, home=home / "x"))


def dataclass_values(cfg: SwarmConfig) -> dict[str, object]:
    return {k: v for k, v in cfg.__dict__.items() if k not in {"source", "workspace_base"}}


def test_path_precedence(home: Path, tmp_path: Path) -> None:
    explicit, from_env = tmp_path / "a.yaml", tmp_path / "b.yaml"
    default = write(home, "max-active: 1\n")
    env = {C.ENV_VAR: str(from_env)}
    assert config_path(explicit, env, home) == explicit
    assert config_path(None, env, home) == from_env
    assert config_path(None, {}, home) == default
    default.unlink()
    assert config_path(None, {}, home) is None


def test_env_path_is_used(home: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.yaml"
    other.write_text("max-active: 9\n")
    write(home, "max-active: 1\n")
    assert load_config(env={C.ENV_VAR: str(other)}, home=home).max_active == 9
    assert load_config(other.parent / "other.yaml", env={}, home=home).source == other


def test_explicit_missing_path_is_an_error(home: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(home / "missing.yaml", env={}, home=home)


def test_home_comes_from_env_when_not_given(home: Path) -> None:
    write(home, "max-active: 2\n")
    assert load_config(env={"HOME": str(home)}).max_active == 2


# --- error messages ---------------------------------------------------------

def test_error_names_file_key_expected_and_got(home: Path) -> None:
    message = error_of(home, "max-active: lots\n")
    path = home / ".agentctl" / "swarm.yaml"
    assert message == f"{path}: max-active: expected an integer 0..1000, got 'lots'"


def test_yaml_syntax_error_names_file_and_line(home: Path) -> None:
    message = error_of(home, "max-active: 5\nroles: [builder\ncount: 3\n")
    assert str(home / ".agentctl" / "swarm.yaml") in message
    assert "line 3" in message and "invalid YAML" in message


def test_unknown_key_with_hint(home: Path) -> None:
    assert "unknown key (did you mean 'max-active'?)" in error_of(home, "max_active: 3\n")
    assert "agent.comand: unknown key (did you mean 'agent.command'?)" in error_of(
        home, "agent:\n  comand: [x]\n")
    message = error_of(home, "flavour: vanilla\n")
    assert "flavour: unknown key" in message and "did you mean" not in message


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(home: Path, text: str) -> None:
    assert "expected a mapping" in error_of(home, text)


def test_unsafe_yaml_tags_are_refused(home: Path) -> None:
    assert "invalid YAML" in error_of(home, "count: !!python/object/apply:os.system ['true']\n")


def test_multi_line_messages_become_one_line() -> None:
    assert str(ConfigError("f: key:\n  expected\r\nthis")) == "f: key: expected this"


def test_non_utf8_file(home: Path) -> None:
    (home / ".agentctl" / "swarm.yaml").write_bytes(b"count: \xff\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(env={}, home=home)


BAD_VALUES = [
    ("count: -1", "count"), ("count: 1001", "count"), ("count: true", "count"),
    ("roles: {wizard: 1}", "roles.wizard"), ("roles: {builder: x}", "roles.builder"),
    ("roles: [builder]", "roles"), ("max-active: 2.5", "max-active"),
    ("token-budget: -5", "token-budget"), ("token-budget: 1e3", "token-budget"),
    ("heartbeat-interval: 0", "heartbeat-interval"),
    ("heartbeat-interval: -3s", "heartbeat-interval"),
    ("heartbeat-interval: soon", "heartbeat-interval"),
    ("heartbeat-interval: .nan", "heartbeat-interval"),
    ("heartbeat-interval: 400d", "heartbeat-interval"),
    ("heartbeat-misses: 0", "heartbeat-misses"), ("max-task-duration: 5x", "max-task-duration"),
    ("workspace-base: relative/dir", "workspace-base"), ("workspace-base: 7", "workspace-base"),
    ("identity-template: 'agent-{index}'", "identity-template"),
    ("identity-template: '{role}.{index}'", "identity-template"),
    ("identity-template: '{role}-{index}-{name}'", "identity-template"),
    ("identity-template: '{role.__class__}-{index}'", "identity-template"),
    ("identity-template: '{role}-{index:0999999999d}'", "identity-template"),
    ("identity-template: '{role}-{index:{role}}'", "identity-template"),
    ("identity-template: '{role}-{index'", "identity-template"),
    ("identity-template: 'a-very-long-prefix-for-{role}-{index:05d}'", "identity-template"),
    ("persist: 'yes please'", "persist"), ("persist: 1", "persist"),
    ("repo: '--upload-pack=evil'", "repo"), ("repo: 'a b'", "repo"),
    ("agentchat: {server: 'http://x'}", "agentchat.server"),
    ("agentchat: {server: 'ws://'}", "agentchat.server"),
    ("agentchat: {server: 'ws://h:99999'}", "agentchat.server"),
    ("agentchat: {channels: []}", "agentchat.channels"),
    ("agentchat: {channels: [agents]}", "agentchat.channels[0]"),
    ("agentchat: {channels: ['#a', '#b c']}", "agentchat.channels[1]"),
    ("agentchat: {channels: ['#a', '#a']}", "agentchat.channels"),
    ("agentchat: {rate-limit: 0}", "agentchat.rate-limit"),
    ("agentchat: [x]", "agentchat"),
    ("agent: {command: []}", "agent.command"), ("agent: {command: 'claude -p'}", "agent.command"),
    ("agent: {command: [claude, '']}", "agent.command"),
    ("agent: {memory-limit: lots}", "agent.memory-limit"),
    ("agent: {memory-limit: 0}", "agent.memory-limit"),
    ("agent: {cpu-weight: 0}", "agent.cpu-weight"),
    ("agent: {cpu-weight: 10001}", "agent.cpu-weight"),
    ("agent: {env: {'BAD-NAME': x}}", "agent.env"), ("agent: {env: {A: [1]}}", "agent.env.A"),
    ("agent: {env: [A]}", "agent.env"),
    ("coordinator: internal", "coordinator"), ("spawn: vfork", "spawn"),
    ("sandbox: chroot", "sandbox"), ("sandbox-allow-read: [rel]", "sandbox-allow-read[0]"),
    ("quota-probe-prompt: ''", "quota-probe-prompt"), ("secrets: {a: b}", "secrets"),
    ("start-timeout: 0s", "start-timeout"), ("status-interval: []", "status-interval"),
    ("shutdown-grace: null", "shutdown-grace"),
    ("health-sample-interval: x", "health-sample-interval"),
]


@pytest.mark.parametrize("text,key", BAD_VALUES)
def test_bad_values_are_refused_naming_the_key(home: Path, text: str, key: str) -> None:
    message = error_of(home, text + "\n")
    assert message.startswith(f"{home / '.agentctl' / 'swarm.yaml'}: {key}: expected "), message


# --- values -----------------------------------------------------------------

def test_full_file_is_typed(home: Path) -> None:
    cfg = load(home, """
        count: 4
        max-active: 2
        token-budget: 2000000
        heartbeat-interval: 1m30s
        heartbeat-misses: 5
        max-task-duration: 2h
        workspace-base: ~/ws
        identity-template: "{role}-{index}"
        persist: true
        repo: https://example.com/x.git
        agentchat:
          server: wss://chat.example.com:8443/ws
          channels: ["#work", "#chat"]
          rate-limit: 0.5
        agent:
          command: [/usr/bin/fake-claude, -p]
          memory-limit: 512M
          cpu-weight: 200
          env: {LANG: C.UTF-8, PORT: 8080}
        coordinator: external
        spawn: exec
        sandbox: bwrap
        sandbox-allow-read: [/srv/data, ~/shared]
        quota-probe-interval: 10m
        quota-probe-prompt: hi
        start-timeout: 5
        status-interval: 2.5
        shutdown-grace: 3s
        health-sample-interval: 15s
    """)
    assert cfg.count == 4 and cfg.roles == {"builder": 0, "auditor": 0, "qa": 0, "general": 4}
    assert cfg.token_budget == 2_000_000 and cfg.heartbeat_interval == 90
    assert cfg.max_task_duration == 7200 and cfg.workspace_base == home / "ws"
    assert cfg.agent_name("qa", 7) == "qa-7" and cfg.persist is True
    assert cfg.agentchat_channels == ("#work", "#chat") and cfg.work_channel == "#work"
    assert cfg.agentchat_rate_limit == 0.5 and cfg.agent_memory_limit == 512 << 20
    assert cfg.agent_env == {"LANG": "C.UTF-8", "PORT": "8080"} and cfg.agent_cpu_weight == 200
    assert cfg.sandbox_allow_read == (Path("/srv/data"), home / "shared")
    assert (cfg.coordinator, cfg.spawn, cfg.sandbox) == ("external", "exec", "bwrap")
    assert (cfg.start_timeout, cfg.status_interval, cfg.shutdown_grace) == (5, 2.5, 3)
    assert cfg.agent_command == ("/usr/bin/fake-claude", "-p")


def test_config_is_immutable(home: Path) -> None:
    cfg = load(home)
    with pytest.raises(AttributeError):
        cfg.max_active = 9  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.agent_env["X"] = "y"  # type: ignore[index]


@pytest.mark.parametrize("text,expected", [
    (30, 30.0), (1.5, 1.5), ("30", 30.0), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0),
    ("1h30m", 5400.0), ("2d", 172800.0), ("250ms", 0.25), (" 10S ", 10.0), ("1.5m", 90.0),
    ("0", 0.0),
])
def test_parse_duration(text: object, expected: float) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "s", "5x", "m5", "1h 30m", "-1", "-1s", "inf", "nan",
                                  True, None, [30], "5mm", 10**400])
def test_parse_duration_refuses(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize("seconds,text", [
    (30, "30s"), (300, "5m"), (5400, "1h30m"), (3600, "1h"), (0.5, "0.5s"), (90, "1m30s"),
    (86400, "1d"),
])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text,expected", [
    (1024, 1024), ("1024", 1024), ("512M", 512 << 20), ("2G", 2 << 30), ("2g", 2 << 30),
    ("1.5GiB", 3 << 29), ("64k", 64 << 10), ("100MB", 100 << 20), ("10b", 10),
])
def test_parse_size(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "M", "5X", "-1", 0, -5, "0M", True, 1.5, "5 GG"])
def test_parse_size_refuses(text: object) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


# --- count, roles and slots -------------------------------------------------

@pytest.mark.parametrize("text,count,roles", [
    ("count: 4", 4, {"builder": 0, "auditor": 0, "qa": 0, "general": 4}),
    ("roles: {builder: 2, qa: 1}", 3, {"builder": 2, "auditor": 0, "qa": 1, "general": 0}),
    ("{count: 5, roles: {auditor: 1, general: 1}}", 5,
     {"builder": 0, "auditor": 1, "qa": 0, "general": 4}),
    ("{count: 0}", 0, {"builder": 0, "auditor": 0, "qa": 0, "general": 0}),
])
def test_count_and_roles(home: Path, text: str, count: int, roles: dict[str, int]) -> None:
    cfg = load(home, text)
    assert cfg.count == count and dict(cfg.roles) == roles


def test_count_below_roles_sum_is_an_error(home: Path) -> None:
    assert "count: expected at least the sum of roles (3), got 2" in error_of(
        home, "{count: 2, roles: {builder: 2, qa: 1}}")


def test_slot_plan_and_names(home: Path) -> None:
    cfg = load(home, "{count: 5, roles: {qa: 1, builder: 2, general: 1}}")
    assert cfg.slot_plan(7) == [("builder", 1), ("builder", 2), ("qa", 1), ("general", 1),
                                ("general", 2), ("general", 3), ("general", 4)]
    assert cfg.slot_plan(2) == [("builder", 1), ("builder", 2)]
    assert cfg.slot_plan(0) == []
    assert [cfg.agent_name(*s) for s in cfg.slot_plan(3)] == [
        "swarm-builder-001", "swarm-builder-002", "swarm-qa-001"]
    with pytest.raises(ValueError):
        cfg.slot_plan(-1)


def test_agent_name_beyond_the_template_is_a_config_error(home: Path) -> None:
    cfg = load(home, "identity-template: 'agents-of-the-{role}-{index:04d}'")
    assert cfg.agent_name("general", 1000) == "agents-of-the-general-1000"
    with pytest.raises(ConfigError, match="not a valid name"):
        cfg.agent_name("general", 10**20)


def test_with_overrides_count(home: Path) -> None:
    cfg = load(home, "roles: {builder: 2}")
    more = with_overrides(cfg, count=4)
    assert more.count == 4 and cfg.count == 2
    assert more.slot_plan(more.count)[-1] == ("general", 2)
    with pytest.raises(ConfigError, match="--count: expected an integer"):
        with_overrides(cfg, count=-1)


# --- role files ---------------------------------------------------------------

def test_role_file_overrides_only_that_role(home: Path) -> None:
    write(home, "agent: {env: {A: '1', B: '2'}, memory-limit: 1G}\n")
    write(home, """
        agent:
          command: [fake, --qa]
          memory-limit: 256M
          cpu-weight: 50
          env: {B: qa}
        max-task-duration: 1h
        instructions: |
          Run the test suite first.
    """, "roles/qa.yaml")
    cfg = load_config(env={}, home=home)
    qa, builder = cfg.for_role("qa"), cfg.for_role("builder")
    assert qa.command == ("fake", "--qa") and qa.memory_limit == 256 << 20
    assert qa.cpu_weight == 50 and qa.max_task_duration == 3600
    assert dict(qa.env) == {"A": "1", "B": "qa"}
    assert qa.instructions == "Run the test suite first.\n"
    assert builder.command == cfg.agent_command and builder.memory_limit == 1 << 30
    assert builder.instructions == "" and dict(builder.env) == {"A": "1", "B": "2"}
    with pytest.raises(ValueError):
        cfg.for_role("wizard")


@pytest.mark.parametrize("text,what", [
    ("count: 3\n", "count: unknown key"),
    ("agent: {command: []}\n", "agent.command: expected"),
    ("max-task-duration: forever\n", "max-task-duration: expected"),
    ("agentchat: {server: embedded}\n", "agentchat: unknown key"),
    ("instructions: 5\n", "instructions: expected"),
    ("[not, a, mapping]\n", "expected a mapping"),
])
def test_bad_role_file_names_the_role_file(home: Path, text: str, what: str) -> None:
    path = write(home, text, "roles/builder.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(env={}, home=home)
    assert str(info.value).startswith(f"{path}: ") and what in str(info.value)


def test_main_file_cannot_carry_instructions(home: Path) -> None:
    assert "instructions: unknown key" in error_of(home, "instructions: hi\n")


# --- secrets ----------------------------------------------------------------

def test_secrets(home: Path) -> None:
    token = home / "token"
    token.write_text("sk-very-secret")
    (home / ".agentctl" / "key.pem").write_text("k")
    cfg = load(home, f"""
        secrets:
          - name: api
            env: ANTHROPIC_API_KEY
            file: {token}
            roles: [builder, qa]
          - name: deploy-key
            file: key.pem
            path: .secrets/deploy.pem
            agents: [swarm-general-001]
    """)
    api, deploy = cfg.secrets
    assert api.env == "ANTHROPIC_API_KEY" and api.path is None and api.file == token
    assert deploy.file == home / ".agentctl" / "key.pem"
    assert [s.name for s in cfg.secrets_for("swarm-builder-001", "builder")] == ["api"]
    assert [s.name for s in cfg.secrets_for("swarm-general-001", "general")] == ["deploy-key"]
    assert cfg.secrets_for("swarm-general-002", "general") == ()
    assert "sk-very-secret" not in repr(cfg)


@pytest.mark.parametrize("entry,key", [
    ("{name: a, file: F, path: ../x, roles: [qa]}", "secrets[0].path"),
    ("{name: a, file: F, path: a/../../x, roles: [qa]}", "secrets[0].path"),
    ("{name: a, file: F, path: /etc/x, roles: [qa]}", "secrets[0].path"),
    ("{name: a, file: F, path: ., roles: [qa]}", "secrets[0].path"),
    ("{name: a, file: F, env: lower_case, roles: [qa]}", "secrets[0].env"),
    ("{name: a, file: F, env: 1ABC, roles: [qa]}", "secrets[0].env"),
    ("{name: a, file: F, env: A, path: x, roles: [qa]}", "secrets[0]"),
    ("{name: a, file: F, roles: [qa]}", "secrets[0]"),
    ("{name: a, file: F, env: A}", "secrets[0].agents"),
    ("{name: a, file: F, env: A, roles: [wizard]}", "secrets[0].roles[0]"),
    ("{name: a, file: F, env: A, agents: ['no spaces']}", "secrets[0].agents[0]"),
    ("{name: a, file: /no/such/file, env: A, roles: [qa]}", "secrets[0].file"),
    ("{name: 'a b', file: F, env: A, roles: [qa]}", "secrets[0].name"),
    ("{name: a, file: F, env: A, roles: [qa], mode: 0600}", "secrets[0].mode"),
    ("just-a-string", "secrets[0]"),
])
def test_bad_secrets(home: Path, entry: str, key: str) -> None:
    secret_file = home / "F"
    secret_file.write_text("x")
    message = error_of(home, f"secrets:\n  - {entry.replace('F', str(secret_file))}\n")
    assert f": {key}: expected" in message, message


def test_duplicate_secret_names(home: Path) -> None:
    (home / "f").write_text("x")
    entry = f"{{name: a, file: {home / 'f'}, env: A, roles: [qa]}}"
    assert "secrets: expected secrets with distinct names" in error_of(
        home, f"secrets: [{entry}, {entry}]\n")


# --- reload diff ----------------------------------------------------------------

def test_diff_configs(home: Path) -> None:
    (home / "f").write_text("secret-value")
    old = load(home, "max-active: 5\ntoken-budget: 1000\n")
    new = load(home, f"""
        max-active: 10
        token-budget: 2000
        heartbeat-interval: 1m
        agent: {{env: {{TOKEN: hunter2}}}}
        secrets: [{{name: gh, file: {home / 'f'}, env: GH_TOKEN, roles: [qa]}}]
    """)
    changes = diff_configs(old, new)
    assert changes == ["max-active 5->10", "token-budget 1000->2000", "heartbeat-interval 30s->1m",
                       "agent.env changed (+TOKEN)", "secrets changed (+gh)"]
    assert "hunter2" not in str(changes) and "secret-value" not in str(changes)
    assert diff_configs(new, new) == []
    unlimited = load(home, "token-budget: null\n")
    assert diff_configs(new, unlimited)[1] == "token-budget 2000->unlimited"


def test_diff_includes_role_files(home: Path) -> None:
    old = load(home)
    write(home, "max-task-duration: 1h\ninstructions: be careful\n", "roles/qa.yaml")
    new = load(home)
    assert diff_configs(old, new) == ["roles/qa.yaml max-task-duration none->1h",
                                      "roles/qa.yaml instructions changed"]


# --- the shipped example ---------------------------------------------------------

def test_packaged_examples_load_and_show_every_key(home: Path) -> None:
    example = EXAMPLES / "swarm.yaml.example"
    if not example.exists():
        pytest.skip("packaging/swarm.yaml.example not written yet")
    raw = yaml.safe_load(example.read_text())
    shown = {f"{k}.{sub}" if k in C.SECTIONS else k: None
             for k, v in raw.items() for sub in (v if k in C.SECTIONS else [None])}
    assert set(shown) == set(C.DEFAULTS), "the example must show every key, and only real keys"
    (home / "secret").write_text("x")
    for entry in raw["secrets"]:  # point the example's secret files at a real one
        entry["file"] = str(home / "secret")
    write(home, yaml.safe_dump(raw))
    role_files = sorted((EXAMPLES / "roles").glob("*.yaml.example"))
    assert [p.name.split(".")[0] for p in role_files] == sorted(C.ROLES)
    for role_file in role_files:
        write(home, role_file.read_text(), f"roles/{role_file.name.removesuffix('.example')}")
    cfg = load_config(env={}, home=home)
    assert all(cfg.for_role(role).instructions for role in C.ROLES)
    assert cfg.for_role("builder").max_task_duration == 3600


# --- property: arbitrary YAML-able input -----------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=30),
    st.sampled_from(["30s", "5m", "1h", "512M", "#agents", "embedded", "ws://h:1", "~/x", "/tmp",
                     "{role}-{index}", "builder", "general", "qa", "auto", "exec", "../x"]),
)
keys = st.one_of(st.sampled_from(sorted({k.split(".")[-1] for k in C.CHECKS} | set(C.SECTIONS)
                                        | {"name", "file", "path", "env", "agents"})),
                 st.text(max_size=12), st.integers())
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)), max_leaves=12)
documents = st.dictionaries(keys, values, max_size=8)

# Mostly-valid documents: known keys with a valid value or, sometimes, a wild one, so
# that the property also covers the combinations that load.
VALID_POOL: dict[str, list[object]] = {
    "count": [0, 1, 7], "roles": [{"builder": 1}, {"qa": 2, "general": 1}, {}],
    "token-budget": [None, 0, 10**6], "max-active": [0, 5], "persist": [True, False],
    "repo": [None, "https://x/y.git", "~/src/repo"], "secrets": [[]],
    "identity-template": ["{role}-{index}", "a-{index:02d}-{role}"],
    "agentchat": [{"server": "ws://127.0.0.1:1"}, {"channels": ["#a", "#b"]}, {"rate-limit": 3}],
    "agent": [{"command": ["x"]}, {"memory-limit": "1G", "cpu-weight": 5}, {"env": {"A": 1}}],
    "heartbeat-interval": ["1m", 5, "1h30m", 0.5], "sandbox-allow-read": [["/usr", "~/x"]],
}
top_keys = sorted({k.split(".")[0] for k in C.DEFAULTS})
plausible_documents = st.dictionaries(
    st.sampled_from(top_keys),
    st.one_of(st.sampled_from([v for pool in VALID_POOL.values() for v in pool]), values),
    max_size=10,
) | st.fixed_dictionaries(
    {}, optional={k: st.sampled_from(v) for k, v in VALID_POOL.items()})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=st.one_of(documents, plausible_documents))
def test_loader_yields_config_or_config_error(doc: dict[object, object]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        (home / ".agentctl").mkdir()
        try:
            text = yaml.safe_dump(doc, allow_unicode=True)
        except yaml.YAMLError:
            return
        (home / ".agentctl" / "swarm.yaml").write_text(text, encoding="utf-8",
                                                        errors="surrogatepass")
        try:
            cfg = load_config(env={}, home=home)
        except ConfigError as exc:
            assert "\n" not in str(exc) and str(exc)
            return
        assert isinstance(cfg, SwarmConfig)
        assert len(cfg.slot_plan(cfg.count)) == cfg.count
        assert all(C.is_valid_agent_name(cfg.agent_name(*s)) for s in cfg.slot_plan(3))


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200))
def test_loader_survives_arbitrary_text(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        (home / ".agentctl").mkdir()
        (home / ".agentctl" / "swarm.yaml").write_text(text, encoding="utf-8",
                                                        errors="surrogatepass")
        try:
            load_config(env={}, home=home)
        except ConfigError as exc:
            assert "\n" not in str(exc)
