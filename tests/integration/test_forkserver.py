"""The fork-server's two ways of making a daemon the supervisor's child, for real.

``proc.fork_as_sibling`` (clone with CLONE_PARENT) is the default; the double fork
through an intermediate is the fallback. Each test runs a small "supervisor" in its
own process (it must be the daemons' parent, and a child subreaper for the double
fork), which prints what it saw as JSON.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from agentctl_swarm import forkserver
from agentctl_swarm.spawner import EXIT_SETUP_FAILED, LaunchPlan
from agentctl_swarm.system import proc

pytestmark = pytest.mark.skipif(not proc.can_fork_as_sibling(),
                                reason="clone(CLONE_PARENT) is wired for x86_64 and aarch64 only")


def _run(script: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


SIBLING = """
    import json, os, random, sys, threading, subprocess
    from agentctl_swarm.system import proc
    from agentctl_swarm.agentchat.identity import Identity
    mine = Identity.generate("parent").agent_id
    r, w = os.pipe()
    grandparent = os.getppid()
    pid = proc.fork_as_sibling()
    if pid == 0:
        box = []
        t = threading.Thread(target=lambda: box.append(threading.get_native_id()))
        t.start(); t.join()
        echo = subprocess.run(["echo", "ok"], capture_output=True, text=True).stdout.strip()
        os.write(w, json.dumps({"ppid": os.getppid(), "pid": os.getpid(),
                                "agent": Identity.generate("child").agent_id,
                                "random": random.random(), "thread": box[0], "echo": echo}).encode())
        os._exit(0)
    os.close(w)
    child = json.loads(os.read(r, 65536))
    child.update(returned=pid, grandparent=grandparent, agent_parent=mine, random_parent=random.random(),
                 not_our_child=False)
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        child["not_our_child"] = True
    print(json.dumps(child))
"""


def test_fork_as_sibling_gives_our_parent_a_working_child() -> None:
    seen = _run(SIBLING)
    assert seen["ppid"] == seen["grandparent"] and seen["pid"] == seen["returned"]
    assert seen["not_our_child"], "the sibling must not be the caller's child"
    assert seen["agent"] != seen["agent_parent"], "the child's key generator was not reseeded"
    assert seen["random"] != seen["random_parent"]
    assert seen["thread"] not in (seen["pid"], 0) and seen["echo"] == "ok"


SUPERVISOR = """
    import asyncio, json, os, select, socket, sys
    from agentctl_swarm import ipc
    from agentctl_swarm.spawner import ForkServerClient, LaunchPlan
    from agentctl_swarm.system import proc

    async def main(double_fork):
        proc.set_child_subreaper(True)
        client = ForkServerClient(os.getpid())
        client.launch(LaunchPlan(name="fork-server", supervisor_pid=os.getpid()), double_fork=double_fork)
        await client.wait_ready()
        seen = []
        for i in range(3):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            # supervisor_pid, as Spawner.spawn_daemon sets it: the daemon waits until it
            # is ours before it says hello (double fork: the intermediate exits first)
            plan = LaunchPlan(name=f"d{i}", supervisor_pid=os.getpid())
            pid = await client.spawn(plan, [theirs.fileno()])
            theirs.close()
            got = asyncio.get_running_loop().create_future()
            chan = await ipc.open_channel(ours, lambda m: got.done() or got.set_result(m), lambda e: None)
            hello = await asyncio.wait_for(got, 10)
            ppid = proc.parent_pid(pid)
            chan.close()  # no boot: the daemon exits at once
            status = await asyncio.to_thread(os.waitpid, pid, 0)
            seen.append({"pid": pid, "hello_pid": hello["pid"], "ppid": ppid, "status": status[1]})
        # A plan the daemon cannot read (a fork-server from another version, say):
        # the daemon still ends as our child, with the set-up failure's exit code.
        bad = LaunchPlan(name="bad")
        bad.to_json = lambda: json.dumps({"name": "bad", "no_such_field": 1})
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = await client.spawn(bad, [theirs.fileno()])
        theirs.close()
        # (double fork: it is the intermediate's child until that exits, so wait for
        # its exit through a pidfd, as the supervisor's reaper does, before waitpid)
        exited = os.pidfd_open(pid)
        await asyncio.to_thread(select.select, [exited], [], [], 10)
        os.close(exited)
        status = os.waitpid(pid, os.WNOHANG)
        ours.close()
        client.close()
        await asyncio.to_thread(os.waitpid, client.pid, 0)
        print(json.dumps({"me": os.getpid(), "daemons": seen,
                          "bad_exit": os.waitstatus_to_exitcode(status[1])}))

    asyncio.run(main(sys.argv[1] == "double"))
"""


@pytest.mark.parametrize("mode", ["sibling", "double"])
def test_each_fork_path_makes_the_daemon_the_supervisors_child(mode: str) -> None:
    seen = _run(SUPERVISOR, mode)
    assert len(seen["daemons"]) == 3
    for daemon in seen["daemons"]:
        assert daemon["hello_pid"] == daemon["pid"]
        assert daemon["ppid"] == seen["me"], daemon  # reaped by us, with its exit status
        assert daemon["status"] == 0, daemon
    assert seen["bad_exit"] == EXIT_SETUP_FAILED


def test_bad_requests_get_an_error_and_the_server_keeps_serving() -> None:
    """The wire format, from the supervisor's side: ``<id>\\n<plan JSON>`` with one
    descriptor. Malformed requests are answered with an error (every descriptor
    received is closed) and the next good request still gets a daemon."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server = subprocess.Popen([sys.executable, "-m", "agentctl_swarm.forkserver", "--fd", str(theirs.fileno())],
                              pass_fds=[theirs.fileno()])
    theirs.close()
    ours.settimeout(30)
    try:
        assert json.loads(ours.recv(4096))["ready"]

        def ask(body: bytes, nfds: int = 1) -> tuple[dict, list[socket.socket]]:
            pairs = [socket.socketpair() for _ in range(nfds)]
            socket.send_fds(ours, [body], [theirs.fileno() for _, theirs in pairs])
            for _, theirs in pairs:
                theirs.close()
            return json.loads(ours.recv(4096)), [mine for mine, _ in pairs]

        def closed_by_server(mine: socket.socket) -> bool:
            mine.settimeout(10)
            return mine.recv(1) == b""  # EOF: no copy of the other end is left open

        reply, _ = ask(b"no id line")
        assert reply["id"] == -1 and "no id line" in reply["error"]
        reply, mine = ask(b"7\n{}", nfds=5)  # one more than MAX_FDS: the kernel drops the rest
        assert reply["id"] == 7 and f"or {forkserver.MAX_FDS} descriptors" in reply["error"]
        assert all(closed_by_server(m) for m in mine)
        reply, _ = ask(b"6\n{}", nfds=0)
        assert reply["id"] == 6 and f"expected 1 to {forkserver.MAX_FDS} descriptors, got 0" in reply["error"]
        reply, mine = ask(b"8\n" + b" " * (70 * 1024))
        assert reply["id"] == 8 and "larger than" in reply["error"]
        assert closed_by_server(mine[0])

        plan = LaunchPlan(name="good", supervisor_pid=os.getpid())
        reply, mine = ask(b"9\n" + plan.to_json().encode())
        assert reply == {"id": 9, "pid": reply["pid"]}
        mine[0].settimeout(10)
        assert b'"hello"' in mine[0].recv(4096)  # the daemon parsed its plan and says hello
        mine[0].close()  # no boot: it exits
        _pid, status = os.waitpid(reply["pid"], 0)  # our child (CLONE_PARENT)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        ours.close()  # the server exits when its supervisor hangs up
        assert server.wait(timeout=30) == 0
