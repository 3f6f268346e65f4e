"""Escape tests: a hostile agent command under each confinement the machine offers.

A fake HOME is planted (ssh key, aws credentials, two workspaces with
context.md and identity keys, swarm state, a listening control socket, a
decoy "supervisor" process of the same uid). The escape agent first runs
unconfined (the control: every escape must work, or the plant proves
nothing), then under Landlock and bwrap, as the invoking user and as a
throwaway ordinary user. Every escape must fail, every legitimate action
must work, and nothing may appear on the host outside the workspace.
"""

from __future__ import annotations

import asyncio
import dataclasses
import grp
import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

from agentctl_swarm.system import sandbox
from agentctl_swarm.system.sandbox import SandboxError, SandboxKind
from tests.forked import in_fork

FAKES = Path(__file__).resolve().parent.parent / "fakes"
ESCAPE_AGENT = FAKES / "escape_agent.py"
THROWAWAY_USER = "swarmsandbox"
LEAK_FD = 200  # high, so nothing the child opens first can reuse the number
# Known gap (SECURITY.md): Landlock up to ABI 7 does not mediate connect() on
# pathname Unix sockets, so a same-uid session reaches the control socket.
LANDLOCK_GAPS = {"escape_connect_control_socket"}


@dataclass
class Runner:
    """Who the agent runs as: uid/gid None means the invoking user."""
    name: str
    uid: int | None
    gid: int | None
    python: str


@dataclass
class Plant:
    base: Path
    home: Path
    workspace: Path
    sibling: Path
    sibling_identity: Path
    state_dir: Path
    control_socket: Path
    private_tmp: Path
    tag: str
    supervisor: subprocess.Popen
    listener: socket.socket

    def host_leftovers(self) -> list[str]:
        """Files an escape would have left on the host, outside the workspace."""
        candidates = [self.home / "escaped.txt", self.home / "moved-out",
                      Path("/var/tmp") / self.tag, Path("/tmp") / self.tag]
        return [str(p) for p in candidates if p.exists()]


def _throwaway_ids() -> tuple[int, int]:
    """Create (once) the system user the ordinary-user runs use."""
    try:
        pw = pwd.getpwnam(THROWAWAY_USER)
    except KeyError:
        subprocess.run(["useradd", "-M", "-r", "-s", "/usr/sbin/nologin", THROWAWAY_USER], check=True)
        pw = pwd.getpwnam(THROWAWAY_USER)
    return pw.pw_uid, grp.getgrgid(pw.pw_gid).gr_gid


@pytest.fixture(params=["invoking-user", "throwaway-user"])
def runner(request: pytest.FixtureRequest) -> Runner:
    if request.param == "invoking-user":
        return Runner("invoking-user", None, None, sys.executable)
    if os.geteuid() != 0:
        pytest.skip("running as an ordinary user needs root to setuid to a throwaway uid")
    if not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("no /usr/bin/python3: pyenv's interpreter under /root (0700) is unreachable "
                    "for an ordinary user")
    uid, gid = _throwaway_ids()
    return Runner("throwaway-user", uid, gid, "/usr/bin/python3")


def _write(path: Path, text: str, mode: int = 0o600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def _drop_to(runner: Runner) -> None:
    """In the child: become the runner's user (no-op for the invoking user)."""
    if runner.uid is not None and runner.gid is not None:
        os.setgroups([])
        os.setgid(runner.gid)
        os.setuid(runner.uid)


@pytest.fixture
def plant(runner: Runner) -> Iterator[Plant]:
    base = Path(tempfile.mkdtemp(prefix="agentctl-sandbox-"))
    base.chmod(0o755)  # traversable by the throwaway user; pytest's tmp_path is 0700
    home = base / "home"
    _write(home / ".ssh/id_ed25519", "-----BEGIN OPENSSH PRIVATE KEY----- planted\n")
    _write(home / ".aws/credentials", "[default]\naws_secret_access_key = planted\n")
    ws, sib = (home / f"dev/claude/swarm-builder-00{i}" for i in (1, 2))
    for w in (ws, sib):
        _write(w / "context.md", f"context of {w.name}\n", 0o644)
        _write(w / f".agentchat/identities/{w.name}.json", '{"private_key": "planted"}\n')
    state_dir = home / ".agentctl/state"
    _write(state_dir / "tasks.json", '{"tasks": []}\n')
    control = home / ".agentctl/run/control.sock"
    control.parent.mkdir(parents=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(control))
    listener.listen(8)
    private_tmp = base / "session-tmp"
    private_tmp.mkdir(mode=0o700)
    if runner.uid is not None:
        for p in [home, *home.rglob("*"), private_tmp]:
            os.lchown(p, runner.uid, runner.gid)
    supervisor = subprocess.Popen(["sleep", "60"], env={"SECRET_TOKEN": "planted"},
                                  preexec_fn=lambda: _drop_to(runner))
    p = Plant(base, home, ws, sib, sib / f".agentchat/identities/{sib.name}.json", state_dir,
              control, private_tmp, f"agentctl-escape-{uuid.uuid4().hex[:8]}", supervisor, listener)
    yield p
    supervisor.kill()
    supervisor.wait()
    listener.close()
    for leftover in (Path("/var/tmp") / p.tag, Path("/tmp") / p.tag):
        leftover.unlink(missing_ok=True)
    shutil.rmtree(base)


@pytest.fixture
def leaked_secret(plant: Plant) -> Iterator[int]:
    """A descriptor on the ssh key in *this* process, at a fixed high number."""
    fd = os.open(plant.home / ".ssh/id_ed25519", os.O_RDONLY | os.O_CLOEXEC)
    os.dup2(fd, LEAK_FD, inheritable=False)
    os.close(fd)
    yield LEAK_FD
    os.close(LEAK_FD)


def _agent_argv(plant: Plant, runner: Runner) -> list[str]:
    return [runner.python, "-I", "-S", str(ESCAPE_AGENT),
            "--plant-home", str(plant.home), "--workspace", str(plant.workspace),
            "--sibling", str(plant.sibling), "--sibling-identity", str(plant.sibling_identity),
            "--state-dir", str(plant.state_dir), "--control-socket", str(plant.control_socket),
            "--private-tmp", str(plant.private_tmp), "--tag", plant.tag,
            "--leaked-fd", str(LEAK_FD), "--supervisor-pid", str(plant.supervisor.pid)]


def run_agent(plant: Plant, runner: Runner, kind: SandboxKind,
              pass_fds: tuple[int, ...] = ()) -> dict[str, str]:
    """Spawn the escape agent as ``runner`` under ``kind`` and return its report."""
    policy = sandbox.session_policy(plant.workspace, plant.private_tmp,
                                    agent_command=runner.python, extra_read=[str(FAKES)])
    if runner.uid is not None:
        # The policy is computed by root here, for another uid; in production the daemon
        # computing it runs as the session's uid. Drop what that uid cannot look up at all
        # (pyenv under /root, 0700), which bwrap would refuse to bind.
        policy = dataclasses.replace(policy, read_only=tuple(
            p for p in policy.read_only if not p.startswith("/root/")))
    argv = _agent_argv(plant, runner)
    if kind is SandboxKind.BWRAP:
        argv = sandbox.bwrap_argv(policy, argv, cwd=str(plant.workspace))

    def preexec() -> None:
        _drop_to(runner)
        if kind is SandboxKind.LANDLOCK:
            sandbox.apply_landlock(policy)

    env = {"PATH": "/usr/bin:/bin", "HOME": str(plant.workspace), "TMPDIR": str(plant.private_tmp),
           "LANG": "C.UTF-8"}
    done = subprocess.run(argv, cwd=plant.workspace, env=env, preexec_fn=preexec, pass_fds=pass_fds,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"escape agent failed ({done.returncode}): {done.stderr[-2000:]}"
    return json.loads(done.stdout)


def _escapes(report: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in report.items() if k.startswith("escape_")}


def test_control_run_unconfined_every_escape_works(plant: Plant, runner: Runner,
                                                   leaked_secret: int) -> None:
    """Without a sandbox, and with the descriptor deliberately passed, every escape succeeds:
    the plant is real, so the denials below are the sandbox's doing."""
    report = run_agent(plant, runner, SandboxKind.NONE, pass_fds=(leaked_secret,))
    expected_failures = {"escape_raw_socket"} if (runner.uid or os.geteuid()) != 0 else set()
    worked = {k for k, v in _escapes(report).items() if v == "ok"}
    assert set(_escapes(report)) - worked == expected_failures, report
    assert all(v == "ok" for k, v in report.items() if k.startswith("legit_")), report


def _available(kind: SandboxKind) -> None:
    if kind is SandboxKind.LANDLOCK and sandbox.landlock_abi() < 1:
        pytest.skip("this kernel offers no Landlock")
    if kind is SandboxKind.BWRAP and not sandbox.bwrap_usable():
        pytest.skip("bwrap is missing or cannot create namespaces here")


@pytest.mark.parametrize("kind", [SandboxKind.LANDLOCK, SandboxKind.BWRAP], ids=lambda k: k.value)
def test_confined_agent_cannot_escape(plant: Plant, runner: Runner, kind: SandboxKind,
                                      leaked_secret: int) -> None:
    """Under each confinement: every escape denied, every legitimate action works.
    The secret descriptor is open in the parent but not passed: close_fds must keep it out."""
    if runner.uid is not None and kind is SandboxKind.BWRAP:
        _available_for_user(runner)
    _available(kind)
    report = run_agent(plant, runner, kind)
    gaps = LANDLOCK_GAPS if kind is SandboxKind.LANDLOCK else set()
    escaped = {k: v for k, v in _escapes(report).items() if v == "ok" and k not in gaps}
    assert escaped == {}, f"{kind.value} as {runner.name}: escapes worked: {escaped}"
    assert {k: v for k, v in report.items() if k.startswith("legit_") and v != "ok"} == {}, report
    assert plant.host_leftovers() == []
    assert report["escape_leaked_fd"] == "denied: EBADF"
    assert (plant.workspace / "result.txt").read_text() == "escaped\n"


def _available_for_user(runner: Runner) -> None:
    """bwrap as an ordinary user needs unprivileged user namespaces."""
    probe = subprocess.run(["bwrap", "--ro-bind", "/", "/", "true"], preexec_fn=lambda: _drop_to(runner),
                           capture_output=True, timeout=10)
    if probe.returncode != 0:
        pytest.skip(f"bwrap unusable for {runner.name}: {probe.stderr.decode().strip()}")


@pytest.mark.skipif(sandbox.landlock_abi() < 1, reason="this kernel offers no Landlock")
def test_landlock_gap_control_socket_is_reachable_by_path(plant: Plant, runner: Runner) -> None:
    """Documents the known gap: if a future kernel closes it, this fails and the gap
    can leave SECURITY.md (the supervisor's peer check is what protects the socket)."""
    report = run_agent(plant, runner, SandboxKind.LANDLOCK)
    assert report["escape_connect_control_socket"] == "ok"


# --- choosing ------------------------------------------------------------------

def test_choose_bwrap_without_bwrap_on_path_refuses(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SandboxError, match="bwrap.*not on PATH"):
        sandbox.choose("bwrap")


def test_choose_bwrap_that_cannot_sandbox_refuses(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A bwrap that fails its probe (as with user namespaces disabled) is refused, with why."""
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    with pytest.raises(SandboxError, match="cannot create namespaces"):
        sandbox.choose("bwrap")
    assert sandbox.bwrap_usable() is False


@pytest.mark.skipif(sandbox.landlock_abi() < 1, reason="this kernel offers no Landlock")
def test_choose_auto_picks_landlock_here() -> None:
    assert sandbox.choose("auto") is SandboxKind.LANDLOCK
    assert sandbox.describe(SandboxKind.LANDLOCK).startswith(f"landlock ABI {sandbox.landlock_abi()}:")


def test_choose_off_and_unknown() -> None:
    assert sandbox.choose("off") is SandboxKind.NONE
    assert "NOT confined" in sandbox.describe(SandboxKind.NONE)
    with pytest.raises(SandboxError, match="unknown value"):
        sandbox.choose("chroot")


# --- the policy ------------------------------------------------------------------

def _grants_reach(policy: sandbox.SandboxPolicy, target: Path) -> list[str]:
    real = Path(os.path.realpath(target))
    return [p for p in policy.read_only + policy.read_write
            if real == Path(os.path.realpath(p)) or Path(os.path.realpath(p)) in real.parents]


def test_policy_grants_nothing_of_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ws, sib = home / "dev/claude/swarm-builder-001", home / "dev/claude/swarm-builder-002"
    for d in (ws, sib, home / ".ssh", home / ".agentctl/state", tmp_path / "tmp-001"):
        d.mkdir(parents=True)
    policy = sandbox.session_policy(ws, tmp_path / "tmp-001", agent_command=sys.executable)
    for secret in (home / ".ssh", sib, home / ".agentctl/state", home, tmp_path):
        assert _grants_reach(policy, secret) == [], secret
    assert str(ws) in policy.read_write
    assert "/etc/passwd" in policy.read_only and "/etc/shadow" not in policy.read_only
    assert not [p for p in policy.read_only if p.startswith("/etc/ssh/ssh_host_") and p.endswith("_key")]


@pytest.mark.parametrize("shared", ["/tmp", "/var/tmp"])
def test_policy_refuses_a_shared_tmpdir(tmp_path: Path, shared: str) -> None:
    with pytest.raises(SandboxError, match="private directory"):
        sandbox.session_policy(tmp_path, Path(shared), agent_command=sys.executable)


def test_policy_narrows_a_program_installed_beside_the_workspaces(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tool in <workspaces>/bin would grant <workspaces> by its prefix: only the file is granted."""
    ws = tmp_path / "claude/swarm-builder-001"
    ws.mkdir(parents=True)
    (tmp_path / "tmp-001").mkdir()
    tool = tmp_path / "claude/bin/agent-tool"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\n")
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{tool.parent}:/usr/bin:/bin")
    policy = sandbox.session_policy(ws, tmp_path / "tmp-001", agent_command="agent-tool --flag")
    assert str(tool) in policy.read_only
    assert _grants_reach(policy, ws.parent / "swarm-builder-002") == []


def test_policy_refuses_a_workspace_under_a_system_directory(tmp_path: Path) -> None:
    (tmp_path / "tmp-001").mkdir()
    with pytest.raises(SandboxError, match="other workspaces would be readable"):
        sandbox.session_policy(Path("/usr/share/doc"), tmp_path / "tmp-001", agent_command="git")


def test_handled_rights_grow_with_the_abi() -> None:
    assert sandbox.handled_fs_rights(1) == (1 << 13) - 1
    assert sandbox.handled_fs_rights(3) & sandbox.FS_TRUNCATE
    assert not sandbox.handled_fs_rights(4) & sandbox.FS_IOCTL_DEV
    assert sandbox.handled_fs_rights(7) == (1 << 16) - 1


def test_bwrap_argv_binds_parents_first_and_keeps_the_command(tmp_path: Path) -> None:
    ws, tmp = tmp_path / "ws", tmp_path / "t"
    ws.mkdir()
    tmp.mkdir()
    policy = sandbox.session_policy(ws, tmp, agent_command="git")
    argv = sandbox.bwrap_argv(policy, ["git", "status"], cwd=str(ws))
    assert argv[-3:] == ["--", "git", "status"]
    assert argv.index("--tmpfs") < argv.index(str(ws))
    assert "--unshare-net" not in argv and "--die-with-parent" in argv
    assert str(tmp_path / "ws") in argv and str(tmp_path) not in argv


@pytest.mark.skipif(sandbox.landlock_abi() < 1, reason="this kernel offers no Landlock")
def test_restrict_self_failure_is_a_sandbox_error() -> None:
    """In a forked child (restrict_self is irreversible): a bad ruleset fd raises, never a no-op."""
    pid = os.fork()
    if pid == 0:
        try:
            sandbox.restrict_self(-1)
        except SandboxError as exc:
            os._exit(0 if "restrict_self failed" in str(exc) else 2)
        os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_the_supervisor_checks_read_only_grants_once_and_the_daemon_trusts_only_that(
        tmp_path: Path) -> None:
    """The ~160 read-only grants are resolved once by the supervisor against the workspace
    parent; a workspace elsewhere, or a grant added later, is still checked in full."""
    from agentctl_swarm.config import load_config
    from agentctl_swarm.isolation import Isolation, _checked
    cfg = tmp_path / "swarm.yaml"
    cfg.write_text(f"workspace-base: {tmp_path / 'claude'}\nsandbox: landlock\n")
    config = load_config(cfg, env={"HOME": str(tmp_path)})
    spec = Isolation(config, SandboxKind.LANDLOCK).sandbox_spec("swarm-general-001", "general")
    assert spec is not None and spec["read_only_checked_for"] == os.path.realpath(tmp_path / "claude")
    ws, tmp = tmp_path / "claude/swarm-general-001", tmp_path / "tmp-001"
    ws.mkdir(parents=True)
    tmp.mkdir()
    checked = _checked(spec)
    policy = sandbox.session_policy(ws, tmp, agent_command="git", read_only=spec["read_only"],
                                    checked=checked)
    assert _grants_reach(policy, ws.parent / "swarm-general-002") == []
    # A grant that is not among the checked ones is resolved and refused...
    with pytest.raises(SandboxError, match="other workspaces would be readable"):
        sandbox.session_policy(ws, tmp, agent_command="git",
                               read_only=[*spec["read_only"], str(tmp_path)], checked=checked)
    # ...and so is every grant when the workspace is not under the checked parent.
    with pytest.raises(SandboxError, match="other workspaces would be readable"):
        sandbox.session_policy(Path("/usr/share/doc"), tmp, agent_command="git",
                               read_only=spec["read_only"], checked=checked)


def test_a_workspace_base_inside_a_read_only_grant_is_not_vouched_for(tmp_path: Path) -> None:
    from agentctl_swarm.config import load_config
    from agentctl_swarm.isolation import Isolation, _checked
    cfg = tmp_path / "swarm.yaml"
    cfg.write_text("workspace-base: /usr/share\nsandbox: landlock\n")
    config = load_config(cfg, env={"HOME": str(tmp_path)})
    spec = Isolation(config, SandboxKind.LANDLOCK).sandbox_spec("swarm-general-001", "general")
    assert spec is not None and spec["read_only_checked_for"] is None and _checked(spec) is None


def _can(action: Callable[[], object]) -> bool:
    try:
        action()
    except PermissionError:
        return False
    return True


@pytest.mark.skipif(sandbox.landlock_abi() < 1, reason="this kernel offers no Landlock")
@pytest.mark.parametrize("built_by", ["parent", "parent-reusing-handles", "daemon"])
def test_a_daemon_completes_the_ruleset_its_supervisor_built(tmp_path: Path, built_by: str) -> None:
    """isolation.daemon_ruleset (the supervisor, before the workspace exists) plus
    confine_daemon (the daemon, after it made its workspace) confine the daemon to its
    workspace, the read-only grants and the secret files it hands on; the descriptor is
    closed. With no descriptor passed (built_by="daemon") the daemon builds it alike;
    built from path handles that already served another daemon's ruleset (as the
    supervisor does in a burst of starts) it confines alike."""
    from agentctl_swarm.isolation import confine_daemon, daemon_ruleset
    base = tmp_path / "claude"
    ws, sibling, tmp = base / "swarm-general-001", base / "swarm-general-002", tmp_path / "tmp-001"
    shared = tmp_path / "shared-ro"
    secret = tmp_path / "token"
    for d in (shared, sibling, tmp):
        d.mkdir(parents=True)
    (sibling / "context.md").write_text("sibling")
    (shared / "readme").write_text("ro")
    secret.write_text("s3cret")
    spec = {"kind": "landlock", "program": "true", "read_only": ["/usr", str(shared)],
            "read_only_checked_for": os.path.realpath(base)}
    grants = [{"name": "tok", "file": str(secret)}]
    fd = None
    if built_by == "parent":
        fd = daemon_ruleset(spec, base, grants)
    elif built_by == "parent-reusing-handles":
        handles = sandbox.PathHandles(fresh_for=60)
        os.close(daemon_ruleset(spec, base, grants, handles))  # another daemon's, first
        fd = daemon_ruleset(spec, base, grants, handles)
        handles.close()
    assert not ws.exists()  # the parent's ruleset is built before the workspace exists

    def daemon() -> dict[str, bool]:
        ws.mkdir(mode=0o700)  # what workspace.prepare does first
        confined = confine_daemon(spec, ws, tmp, grants, fd)
        fd_closed = True
        if fd is not None:
            try:
                os.fstat(fd)
                fd_closed = False
            except OSError:
                fd_closed = True
        return {"confined": confined == "landlock", "fd_closed": fd_closed,
                "write_own": _can(lambda: (ws / "f").write_text("x")),
                "write_tmp": _can(lambda: (tmp / "f").write_text("x")),
                "read_shared": _can(lambda: (shared / "readme").read_text()),
                "read_secret": _can(lambda: secret.read_text()),
                "read_usr": _can(lambda: os.listdir("/usr")),
                "write_shared": _can(lambda: (shared / "new").write_text("x")),
                "read_sibling": _can(lambda: (sibling / "context.md").read_text()),
                "write_base": _can(lambda: (base / "planted").write_text("x")),
                "read_home": _can(lambda: os.listdir(tmp_path))}

    seen = in_fork(lambda _fd: daemon())
    if fd is not None:
        os.close(fd)  # the parent's own copy, as the supervisor closes it after the spawn
    assert seen == {"confined": True, "fd_closed": True, "write_own": True, "write_tmp": True,
                    "read_shared": True, "read_secret": True, "read_usr": True,
                    "write_shared": False, "read_sibling": False, "write_base": False,
                    "read_home": False}


def test_split_layers_covers_each_grant_outside_the_workspaces_by_one_directory(tmp_path: Path) -> None:
    """The own layer allows everything beneath the topmost directory of each grant that
    does not contain the workspaces, and holds exactly the grants inside them or on
    their way: the shared layer narrows the first kind, nothing narrows the second."""
    base = tmp_path / "home" / "dev" / "claude"
    (base / "kept").mkdir(parents=True)
    (tmp_path / "home" / ".pyenv" / "bin").mkdir(parents=True)
    policy = sandbox.SandboxPolicy(
        read_write=("/dev/null", str(tmp_path / "home" / "dev")),
        read_only=("/etc/passwd", "/usr/lib", str(tmp_path / "home" / ".pyenv" / "bin"),
                   str(base / "kept")))
    handles = sandbox.PathHandles(fresh_for=60)
    try:
        if sandbox.landlock_abi() < 1:
            pytest.skip("this kernel offers no Landlock (the shared layer is built)")
        shared, own = handles.shared_layer(policy, str(base))
        assert handles.shared_layer(policy, str(base))[0] == shared  # once per generation
    finally:
        handles.close()
    with pytest.raises(OSError):
        os.fstat(shared)  # closed with its generation
    home = os.path.realpath(tmp_path / "home")
    assert set(own.read_write) == {"/dev", "/etc", "/usr", f"{home}/.pyenv",
                                   str(tmp_path / "home" / "dev")}
    assert own.read_only == (str(base / "kept"),)


def _reach(ws: Path, sibling: Path, base: Path, shared_ro: Path, secret: Path) -> dict[str, bool]:
    """What a confined daemon can do, probe by probe."""
    tmp = ws / ".tmp"
    return {"write_own": _can(lambda: (ws / "f").write_text("x")),
            "write_tmp": _can(lambda: (tmp / "f").write_text("x")),
            "read_shared": _can(lambda: (shared_ro / "readme").read_text()),
            "write_shared": _can(lambda: (shared_ro / "new").write_text("x")),
            "read_secret": _can(lambda: secret.read_text()),
            "read_usr": _can(lambda: os.listdir("/usr")),
            "write_usr": _can(lambda: open("/usr/planted-by-test", "w").close()),
            "read_passwd": _can(lambda: open("/etc/passwd").read()),
            "read_shadow": _can(lambda: open("/etc/shadow").read()),
            "write_dev_null": _can(lambda: open("/dev/null", "w").write("x")),
            "read_sibling": _can(lambda: (sibling / "context.md").read_text()),
            "write_sibling": _can(lambda: (sibling / "planted").write_text("x")),
            "list_base": _can(lambda: os.listdir(base)),
            "write_base": _can(lambda: (base / "planted").write_text("x")),
            "read_home": _can(lambda: os.listdir(base.parent))}


@pytest.mark.skipif(sandbox.landlock_abi() < 1, reason="this kernel offers no Landlock")
@pytest.mark.parametrize("layout", ["tmp-in-workspace", "tmp-elsewhere"])
def test_two_layers_confine_a_daemon_as_one_ruleset_does(tmp_path: Path, layout: str) -> None:
    """daemon_rulesets (a shared layer and the daemon's own) reach exactly what
    daemon_ruleset's single ruleset reaches, probe by probe, with the real read-only
    grants (``/etc`` entry by entry, its secrets left out): own workspace and tmp
    writable, siblings and the workspaces' directory out of reach, ``/etc/shadow``
    unreadable though the own layer allows all of ``/etc``. With the tmp outside the
    workspaces' directory (which the shared layer would not allow), the daemon drops
    the layers and builds one whole ruleset itself, and still reaches the same."""
    from agentctl_swarm.isolation import confine_daemon, daemon_ruleset, daemon_rulesets
    base = tmp_path / "home" / "claude"
    shared_ro = tmp_path / "shared-ro"
    secret = tmp_path / "token"
    shared_ro.mkdir()
    (shared_ro / "readme").write_text("ro")
    secret.write_text("s3cret")
    spec = {"kind": "landlock", "program": "true", "extra_read": [str(shared_ro)]}
    grants = [{"name": "tok", "file": str(secret)}]
    handles = sandbox.PathHandles(fresh_for=60)
    seen = {}
    try:
        for how in ("one", "two"):
            ws, sibling = base / f"swarm-general-{how}", base / f"swarm-qa-{how}"
            sibling.mkdir(parents=True)
            (sibling / "context.md").write_text("sibling")
            if how == "one":
                fds = {"ruleset": daemon_ruleset(spec, base, grants)}
            else:
                os.close(daemon_rulesets(spec, base, grants, handles)["ruleset"])  # another's first
                fds = daemon_rulesets(spec, base, grants, handles)
                assert set(fds) == {"shared", "ruleset"}

            def daemon(_fd: int, ws: Path = ws, sibling: Path = sibling, fds: dict = fds) -> dict:
                ws.mkdir(mode=0o700)
                tmp = ws / ".tmp" if layout == "tmp-in-workspace" else tmp_path / f"tmp-{ws.name}"
                tmp.mkdir()
                if layout == "tmp-elsewhere":  # probe the tmp confine_daemon was given
                    (ws / ".tmp").symlink_to(tmp)
                confined = confine_daemon(spec, ws, tmp, grants, fds["ruleset"], fds.get("shared"))
                return {"confined": confined, **_reach(ws, sibling, base, shared_ro, secret)}

            seen[how] = in_fork(daemon)
            for fd in fds.values():
                os.close(fd)
    finally:
        handles.close()
    assert seen["two"] == seen["one"]
    assert seen["one"] == {"confined": "landlock", "write_own": True, "write_tmp": True,
                           "read_shared": True, "write_shared": False, "read_secret": True,
                           "read_usr": True, "write_usr": False, "read_passwd": True,
                           "read_shadow": False, "write_dev_null": True, "read_sibling": False,
                           "write_sibling": False, "list_base": False, "write_base": False,
                           "read_home": False}


@pytest.mark.skipif(sandbox.landlock_abi() < 1, reason="this kernel offers no Landlock")
def test_the_supervisors_ruleset_is_refused_with_an_unvouched_grant(tmp_path: Path) -> None:
    """A read-only grant that contains the workspaces (not among those the supervisor
    checked) makes daemon_ruleset raise, as session_policy does: the supervisor then
    passes nothing, and the daemon's own attempt says why."""
    from agentctl_swarm.isolation import daemon_ruleset
    base = tmp_path / "claude"
    base.mkdir()
    spec = {"kind": "landlock", "program": "true", "read_only": ["/usr"],
            "read_only_checked_for": os.path.realpath(base)}
    with pytest.raises(SandboxError, match="other workspaces would be readable"):
        daemon_ruleset(spec, base, [{"name": "x", "file": str(tmp_path)}])
    assert daemon_ruleset({"kind": "bwrap"}, base, []) is None
    assert daemon_ruleset(None, base, []) is None


def test_rule_path_handles_are_reused_while_fresh_then_reopened(tmp_path: Path) -> None:
    """sandbox.PathHandles: one descriptor per path for ``fresh_for`` seconds, then the
    paths are opened again, so a file replaced by rename is granted as it now is."""
    target, missing = tmp_path / "passwd", tmp_path / "absent"
    target.write_text("old")
    handles = sandbox.PathHandles(fresh_for=0.3)
    first = handles.get(str(target))
    assert first is not None and first[1] is False  # a file, not a directory
    assert handles.get(str(target)) == first and handles.get(str(missing)) is None
    assert handles.get(str(tmp_path)) is not None and handles.get(str(tmp_path))[1] is True
    (tmp_path / "passwd.new").write_text("new")
    os.replace(tmp_path / "passwd.new", target)  # as useradd replaces /etc/passwd
    assert handles.get(str(target)) == first  # still the old inode, within the window
    assert os.fstat(first[0]).st_ino != target.stat().st_ino
    time.sleep(0.35)
    renewed = handles.get(str(target))
    assert renewed is not None and os.fstat(renewed[0]).st_ino == target.stat().st_ino
    assert len(handles) == 1  # the old generation was closed, not kept beside the new
    handles.close()
    assert len(handles) == 0


def test_what_is_derived_from_the_paths_is_worked_out_once_per_generation(tmp_path: Path) -> None:
    """PathHandles.derived: a daemon's policy (~170 paths checked and resolved) is the same
    for every daemon of a role within a generation, and worked out again with the handles."""
    handles = sandbox.PathHandles(fresh_for=0.3)
    made: list[int] = []

    def make() -> int:
        made.append(len(made))
        return made[-1]

    assert handles.derived("k", make) == 0 and handles.derived("k", make) == 0
    assert handles.derived("other", make) == 1  # another key: its own
    time.sleep(0.35)
    assert handles.derived("k", make) == 2  # a new generation
    handles.close()
    assert handles.derived("k", make) == 3  # closed with the handles


def test_rule_path_handles_close_themselves_when_stale_under_a_loop(tmp_path: Path) -> None:
    """An idle supervisor holds no handles: they would pin filesystems against umount."""
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    async def scenario() -> tuple[int, int, int]:
        handles = sandbox.PathHandles(fresh_for=0.2)
        before = open_fds()
        for name in ("a", "b", "c"):
            (tmp_path / name).write_text(name)
            handles.get(str(tmp_path / name))
        during = open_fds()
        await asyncio.sleep(0.35)
        return before, during, open_fds()

    before, during, after = asyncio.run(scenario())
    assert during == before + 3 and after == before


@pytest.mark.skipif(sandbox.landlock_abi() < 1, reason="this kernel offers no Landlock")
def test_a_ruleset_from_stale_handles_misses_a_replaced_file_and_fresh_ones_grant_it(
        tmp_path: Path) -> None:
    """Why handles expire: a rule binds an inode. A file replaced by rename after its
    handle was opened is not granted by rulesets built from that handle, and is again
    once the handles are renewed."""
    target = tmp_path / "conf"
    target.write_text("old")
    policy = sandbox.SandboxPolicy(read_write=(), read_only=(str(target),))
    handles = sandbox.PathHandles(fresh_for=0.3)
    os.close(sandbox.prepare_landlock(policy, handles=handles))  # opens the handle
    (tmp_path / "conf.new").write_text("new")
    os.replace(tmp_path / "conf.new", target)
    stale = sandbox.prepare_landlock(policy, handles=handles)
    time.sleep(0.35)
    fresh = sandbox.prepare_landlock(policy, handles=handles)
    handles.close()

    def reads_under(ruleset: int) -> bool:
        sandbox.restrict_self(ruleset)
        return _can(lambda: target.read_text())

    try:
        assert in_fork(lambda _fd: reads_under(stale)) is False
        assert in_fork(lambda _fd: reads_under(fresh)) is True
    finally:
        os.close(stale)
        os.close(fresh)
