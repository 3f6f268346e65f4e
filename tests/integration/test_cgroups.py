"""Per-daemon memory limits on the real kernel: cgroup v1 as root, RLIMIT_AS as a user, v2 where offered.

Each test works under its own base name, so it never touches the groups of a
swarm (or another test run) on the same machine.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentctl_swarm.system import cgroups
from agentctl_swarm.system.cgroups import AgentCgroup, CgroupError, CgroupManager, Enforcement, join_spec
from agentctl_swarm.system.proc import process_cgroup
from tests.forked import in_fork

MiB = 1 << 20
HOG = "b = bytearray({size}); b[::4096] = b'x' * len(b[::4096])"


def _unique() -> str:
    return f"agentctl-swarm-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _manager(kind: str, **kwargs: object) -> CgroupManager:
    try:
        return CgroupManager.detect(name=_unique(), prefer=kind, **kwargs)  # type: ignore[arg-type]
    except CgroupError as exc:
        pytest.skip(str(exc))


def _cgroupspy_param() -> list[object]:
    try:
        import cgroupspy  # noqa: F401
    except ImportError:
        spy = pytest.param(True, id="cgroupspy", marks=pytest.mark.skip(reason="cgroupspy is not installed"))
    else:
        spy = pytest.param(True, id="cgroupspy")
    return [spy, pytest.param(False, id="plain-files")]


@pytest.fixture(params=_cgroupspy_param())
def v1(request: pytest.FixtureRequest) -> Iterator[CgroupManager]:
    manager = _manager("cgroup-v1", use_cgroupspy=request.param)
    yield manager
    manager.cleanup_stale()
    manager.remove_base()
    assert manager.base is not None and not manager.base.exists()


def _spawn_in(group: AgentCgroup, code: str) -> subprocess.Popen[bytes]:
    """A Python child that joins ``group`` from its spec before running ``code``."""
    prelude = (
        "import json, sys\n"
        "from agentctl_swarm.system.cgroups import join_spec\n"
        "join_spec(json.loads(sys.argv[1]))\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", prelude + code, json.dumps(group.to_spec())], stdout=subprocess.PIPE
    )


def test_v1_oom_kill_is_counted_and_group_removed(v1: CgroupManager) -> None:
    group = v1.create("swarm-builder-001", 64 * MiB)
    assert group.oom_kills() == 0
    child = _spawn_in(group, HOG.format(size=200 * MiB))
    assert child.wait(timeout=60) == -signal.SIGKILL
    assert group.oom_kills() >= 1
    assert group.to_dict()["oom_kills"] >= 1
    v1.remove("swarm-builder-001")
    assert group.path is not None and not group.path.exists()
    v1.remove("swarm-builder-001")  # already gone: fine


def test_v1_usage_procs_and_remove_kills_leftovers(v1: CgroupManager) -> None:
    group = v1.create("swarm-qa-002", 256 * MiB)
    child = _spawn_in(group, HOG.format(size=20 * MiB) + "\nprint('ok', flush=True)\nimport time; time.sleep(60)")
    assert child.stdout is not None and child.stdout.readline() == b"ok\n"
    assert group.procs() == [child.pid]
    assert group.path is not None
    assert process_cgroup(child.pid)["memory"].endswith(f"/{v1.base.name}/swarm-qa-002")  # type: ignore[union-attr]
    current = group.memory_current()
    assert current is not None and current >= 20 * MiB
    status = group.to_dict()
    assert status["enforcement"] == "cgroup-v1" and status["memory_limit"] == 256 * MiB
    v1.remove("swarm-qa-002")
    assert child.wait(timeout=10) == -signal.SIGKILL
    assert not group.path.exists()


def test_v1_limits_are_written_and_updatable(v1: CgroupManager) -> None:
    group = v1.create("swarm-general-003", 64 * MiB)
    assert group.path is not None
    limit = group.path / "memory.limit_in_bytes"
    memsw = group.path / "memory.memsw.limit_in_bytes"
    assert int(limit.read_text()) == 64 * MiB
    if memsw.exists():
        assert int(memsw.read_text()) == 64 * MiB
    v1.create("swarm-general-003", 512 * MiB)  # growing needs memsw raised first
    assert int(limit.read_text()) == 512 * MiB
    v1.create("swarm-general-003", 32 * MiB)  # shrinking needs the limit lowered first
    assert int(limit.read_text()) == 32 * MiB
    if memsw.exists():
        assert int(memsw.read_text()) == 32 * MiB
    assert v1.group("swarm-general-003").memory_limit == 32 * MiB


def test_v1_cleanup_stale_kills_and_removes(v1: CgroupManager) -> None:
    left = v1.create("swarm-builder-007", None)
    v1.create("swarm-builder-008", None)
    child = _spawn_in(left, "print('ok', flush=True)\nimport time; time.sleep(60)")
    assert child.stdout is not None and child.stdout.readline() == b"ok\n"
    fresh = CgroupManager(Enforcement.CGROUP_V1, v1.base)  # the next run, after a crash
    assert fresh.cleanup_stale() == ["swarm-builder-007", "swarm-builder-008"]
    assert child.wait(timeout=10) == -signal.SIGKILL
    assert v1.base is not None and not [p for p in v1.base.iterdir() if p.is_dir()]


def test_v1_description_and_detection_as_root(v1: CgroupManager) -> None:
    assert v1.enforcement is Enforcement.CGROUP_V1
    assert v1.description.startswith("cgroup-v1 memory at /")
    own = process_cgroup("self")["memory"]
    assert str(v1.base).endswith(f"{own.rstrip('/')}/{v1.base.name}")  # type: ignore[union-attr]


def test_invalid_agent_names_are_refused(v1: CgroupManager) -> None:
    for bad in ("", "..", "a/b", "supervisor"):
        with pytest.raises(CgroupError):
            v1.create(bad, None)


def test_rlimit_path_as_an_ordinary_user() -> None:
    """A non-root child: detection falls back to RLIMIT_AS, and an overrun fails."""
    manager = CgroupManager.detect(prefer="rlimit")
    group = manager.create("swarm-builder-004", 256 * MiB)
    assert group.oom_kills() == 0 and group.memory_current() is None and group.procs() == []
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_fd)
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            found = CgroupManager.detect(name=_unique())
            os.write(write_fd, json.dumps([found.enforcement.value, found.why]).encode())
            os.close(write_fd)
            join_spec(json.loads(json.dumps(group.to_spec())))
            bytearray(512 * MiB)
            code = 0
        except MemoryError:
            code = 3
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        enforcement, why = json.loads(pipe.read())
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 3
    assert enforcement == "rlimit"
    assert "not writable" in why or "no memory controller" in why


def test_rlimit_fallback_warns_which_enforcement() -> None:
    def detect_as_nobody(_result_fd: int) -> str:  # setuid cannot be undone: in a child
        if os.geteuid() == 0:
            os.setuid(65534)
        warnings = _Collected()
        logging.getLogger(cgroups.__name__).addHandler(warnings)
        CgroupManager.detect(name=_unique())
        return "".join(warnings.messages)

    warning = in_fork(detect_as_nobody)
    assert warning.startswith("memory limits are enforced with RLIMIT_AS")
    assert "cgroup v1" in warning and "cgroup v2" in warning


class _Collected(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_no_limit_and_no_cgroup_is_none() -> None:
    manager = CgroupManager.detect(prefer="none")
    group = manager.create("swarm-builder-005", None)
    assert manager.enforcement is Enforcement.NONE and group.to_spec() == {"enforcement": "none", "memory_limit": None}
    group.join()  # nothing to do, nothing raised
    assert AgentCgroup.from_spec("x", group.to_spec()).enforcement is Enforcement.NONE


def test_spec_round_trip_through_json() -> None:
    group = AgentCgroup("a", Enforcement.CGROUP_V1, Path("/sys/fs/cgroup/memory/x/a"), 64 * MiB)
    again = AgentCgroup.from_spec("a", json.loads(json.dumps(group.to_spec())))
    assert (again.enforcement, again.path, again.memory_limit) == (group.enforcement, group.path, group.memory_limit)


def test_unavailable_preference_is_an_error_naming_why() -> None:
    if cgroups._v2_base("x")[0] is not None:
        pytest.skip("this machine has a usable cgroup v2 subtree")
    with pytest.raises(CgroupError, match="cgroup-v2 is not available: cgroup v2 at "):
        CgroupManager.detect(prefer="cgroup-v2")


def test_v2_delegated_subtree() -> None:
    base, why = cgroups._v2_base(_unique())
    if base is None:
        pytest.skip(f"no writable cgroup v2 subtree with the memory controller here: {why}")
    manager = CgroupManager.detect(name=base.name, prefer="cgroup-v2")
    manager.prepare_supervisor()
    assert "memory" in (manager.base / "cgroup.subtree_control").read_text()  # type: ignore[operator]
    group = manager.create("swarm-builder-006", 64 * MiB, cpu_weight=50)
    child = _spawn_in(group, HOG.format(size=200 * MiB))
    assert child.wait(timeout=60) == -signal.SIGKILL
    assert group.oom_kills() >= 1
    manager.remove("swarm-builder-006")
    assert group.path is not None and not group.path.exists()


def test_remove_waits_until_the_group_is_empty(v1: CgroupManager) -> None:
    group = v1.create("swarm-builder-009", None)
    code = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ok', flush=True)\ntime.sleep(60)"
    children = [_spawn_in(group, code) for _ in range(3)]
    for child in children:
        assert child.stdout is not None and child.stdout.readline() == b"ok\n"
    start = time.monotonic()
    v1.remove("swarm-builder-009")
    assert time.monotonic() - start < 2
    assert [c.wait(timeout=5) for c in children] == [-signal.SIGKILL] * 3
