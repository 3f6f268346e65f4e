"""Linux process helpers, exercised on real child processes."""

from __future__ import annotations

import errno
import os
import resource
import select
import signal
import subprocess
import sys
import time

import pytest

from agentctl_swarm.system import proc
from tests.forked import in_fork


def _sleeper(code: str = "import time; time.sleep(60)") -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", code])


def test_subreaper_and_pdeathsig() -> None:
    """An orphan with PDEATHSIG=SIGKILL dies with its parent and is reparented to us."""
    proc.set_child_subreaper(True)
    try:
        assert proc.get_child_subreaper() is True
        inner_r, inner_w = os.pipe()
        outer_r, outer_w = os.pipe()
        middle = os.fork()
        if middle == 0:
            grandchild = os.fork()
            if grandchild == 0:
                proc.set_pdeathsig(signal.SIGKILL)
                os.write(inner_w, b"x")
                time.sleep(30)
                os._exit(0)
            os.read(inner_r, 1)  # exit only once the grandchild is armed
            os.write(outer_w, f"{grandchild}\n".encode())
            os._exit(0)
        grandchild_pid = int(os.read(outer_r, 32).decode().split()[0])
        for fd in (inner_r, inner_w, outer_r, outer_w):
            os.close(fd)
        os.waitpid(middle, 0)
        _, status = os.waitpid(grandchild_pid, 0)  # only possible because we are its subreaper
        assert proc.describe_exit(status).reason == "killed by SIGKILL"
    finally:
        proc.set_child_subreaper(False)
    assert proc.get_child_subreaper() is False


def test_pidfd_wakes_on_exit_and_waitid_decodes() -> None:
    child = _sleeper()
    pidfd = proc.pidfd_open(child.pid)
    try:
        assert select.select([pidfd], [], [], 0.05)[0] == []
        child.send_signal(signal.SIGKILL)
        assert select.select([pidfd], [], [], 5)[0] == [pidfd]
        result = os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
        info = proc.describe_exit(result)
        assert (info.code, info.signal, info.reason, info.ok) == (None, signal.SIGKILL, "killed by SIGKILL", False)
    finally:
        os.close(pidfd)


@pytest.mark.parametrize(("code", "reason"), [(0, "ok"), (1, "exit 1"), (77, "exit 77")])
def test_describe_exit_codes(code: int, reason: str) -> None:
    child = subprocess.Popen([sys.executable, "-c", f"raise SystemExit({code})"])
    _, status = os.waitpid(child.pid, 0)
    child.returncode = code  # reaped by us; keep Popen from waiting again
    info = proc.describe_exit(status)
    assert (info.code, info.signal, info.reason, info.ok) == (code, None, reason, code == 0)
    assert proc.describe_returncode(code) == info


def test_describe_returncode_for_signals() -> None:
    child = _sleeper()
    child.send_signal(signal.SIGTERM)
    assert proc.describe_returncode(child.wait()).reason == "killed by SIGTERM"
    assert proc.describe_returncode(-200).reason == "killed by signal 200"


def test_raise_nofile_limit() -> None:
    def body(_: int) -> list[int]:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        return [proc.raise_nofile_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard]

    raised, soft, hard = in_fork(body)  # type: ignore[misc]
    assert raised == soft == hard > 256


def test_close_fds_keeps_only_what_is_asked_and_is_fast() -> None:
    def body(result_fd: int) -> dict[str, object]:
        proc.raise_nofile_limit()
        null = os.open(os.devnull, os.O_RDONLY)
        opened = [os.dup(null) for _ in range(4000)]
        keep = {result_fd, opened[10], opened[2000], opened[-1]}
        start = time.perf_counter()
        proc.close_fds(keep)
        elapsed = time.perf_counter() - start
        left = sorted(int(n) for n in os.listdir("/proc/self/fd"))
        return {"elapsed": elapsed, "left": left, "keep": sorted(keep)}

    result = in_fork(body)
    assert isinstance(result, dict)
    left = [fd for fd in result["left"] if fd > 2]
    # listdir's own directory descriptor may show up once, at the lowest free number.
    assert [fd for fd in left if fd not in result["keep"]] in ([], [3])
    assert set(result["keep"]) <= set(left)
    assert result["elapsed"] < 0.05


def test_close_fds_in_a_real_child_closes_the_pipe_end() -> None:
    """If the child keeps no copy of the write end, the parent sees EOF."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        proc.close_fds(set())
        time.sleep(0.5)
        os._exit(0)
    os.close(write_fd)
    start = time.monotonic()
    assert os.read(read_fd, 1) == b""
    assert time.monotonic() - start < 0.4  # EOF came from close_fds, not from exit
    os.close(read_fd)
    os.waitpid(pid, 0)


def test_memory_usage_counts_private_pages() -> None:
    code = "import sys, time; b = bytearray(50 << 20); b[::4096] = b'x' * len(b[::4096]); print('ok', flush=True); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ok\n"
        usage = proc.memory_usage(child.pid)
        assert usage is not None
        assert usage["uss"] >= 50 << 20
        assert usage["rss"] >= usage["pss"] >= usage["uss"]
    finally:
        child.kill()
        child.wait()
    assert proc.memory_usage(child.pid) is None


def test_cpu_seconds() -> None:
    code = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\nprint('ok', flush=True)\ntime.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ok\n"
        seconds = proc.cpu_seconds(child.pid)
        assert seconds is not None and 0.25 <= seconds < 5
    finally:
        child.kill()
        child.wait()
    assert proc.cpu_seconds(child.pid) is None


def test_children_of_direct_and_recursive() -> None:
    code = (
        "import subprocess, sys, time\n"
        "kids = [subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']) for _ in range(2)]\n"
        "print(' '.join(str(k.pid) for k in kids), flush=True)\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert child.stdout is not None
        grandchildren = sorted(int(p) for p in child.stdout.readline().split())
        assert child.pid in proc.children_of(os.getpid())
        assert proc.children_of(child.pid) == grandchildren
        assert set(proc.children_of(os.getpid(), recursive=True)) >= {child.pid, *grandchildren}
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()


def test_process_cgroup_matches_the_kernel_file() -> None:
    child = _sleeper()
    try:
        groups = proc.process_cgroup(child.pid)
        lines = open(f"/proc/{child.pid}/cgroup").read().splitlines()
        assert groups[proc.UNIFIED] == next(line.split(":", 2)[2] for line in lines if line.startswith("0::"))
        for line in lines:
            _, controllers, path = line.split(":", 2)
            for controller in filter(None, controllers.split(",")):
                assert groups[controller] == path
    finally:
        child.kill()
        child.wait()
    assert proc.process_cgroup(child.pid) == {}


def _merge_any(pid: int | str = "self") -> bool:
    return "ksm_merge_any: yes" in open(f"/proc/{pid}/ksm_stat").read()


KSM_PRCTL = os.path.exists("/proc/self/ksm_stat") and in_fork(lambda fd: proc.set_memory_merge(True))


@pytest.mark.skipif(not KSM_PRCTL, reason="no PR_SET_MEMORY_MERGE or /proc/PID/ksm_stat (Linux < 6.4 or no KSM)")
def test_memory_merge_is_set_per_launch_plan_and_survives_exec_only_as_asked() -> None:
    """A daemon's opt-in is inherited across fork and exec; a plan with merge_pages=False
    (every agent session's) takes it away again before the exec."""
    from agentctl_swarm.spawner import LaunchPlan, apply_in_child

    def child(merge: bool | None) -> str:
        def body(fd: int) -> str:
            proc.set_memory_merge(True)  # as a daemon with merge-pages: true
            out_r, out_w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.dup2(out_w, 1)
                apply_in_child(LaunchPlan(name="t", new_session=False, merge_pages=merge,
                                          keep_fds=(1,)))
                os.execv("/bin/cat", ["cat", "/proc/self/ksm_stat"])
            os.close(out_w)
            with os.fdopen(out_r) as pipe:
                text = pipe.read()
            os.waitpid(pid, 0)
            return text
        return str(in_fork(body))

    assert "ksm_merge_any: yes" in child(None)  # inherited as is
    assert "ksm_merge_any: yes" in child(True)
    assert "ksm_merge_any: no" in child(False)
    assert not _merge_any()  # this test process never asked



def test_pdeathsig_failure_is_reported_with_its_errno() -> None:
    """A refused prctl surfaces as OSError with the kernel's errno, not a silent no-op."""
    with pytest.raises(OSError) as failure:
        proc.set_pdeathsig(999)  # no such signal
    assert failure.value.errno == errno.EINVAL
