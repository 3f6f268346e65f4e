"""The soak's agent command: report each session to the soak's recorder, then run the fake.

Why a wrapper: the soak must see every session of every task (to prove that no
task runs twice at the same time), including sessions that are killed before
they print anything. Sessions are confined by Landlock, which forbids writing
outside the workspace, but (up to ABI 7) not sending a datagram to a pathname
Unix socket; so the wrapper sends ``start`` before the fake runs, ``child`` with
the fake's pid, and ``end`` with its exit status. The recorder opens a pidfd for
each pid, so it learns the exit time even of a session killed with SIGKILL.

argv: soak_agent.py FAKE_CLAUDE_PY [claude flags...] PROMPT; env SOAK_RECORDER.
Imports are kept to the standard library's cheapest modules: it runs per session.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time


def task_of(prompt):
    """The task id the soak put in the prompt as ``[soak:ID]`` ("" for probes)."""
    start = prompt.find("[soak:")
    end = prompt.find("]", start)
    return prompt[start + 6:end] if start >= 0 and end > start else ""


def report(sock, path, **fields):
    fields["t"] = time.time()
    try:
        sock.sendto(json.dumps(fields).encode(), path)
    except OSError as exc:  # the soak counts missing reports; never block the session
        sys.stderr.write("soak_agent: report failed: %s\n" % exc)


def main(argv):
    path = os.environ.get("SOAK_RECORDER", "")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    task = task_of(argv[-1] if argv else "")
    report(sock, path, ev="start", task=task, pid=os.getpid(), pgid=os.getpgid(0))
    child = subprocess.Popen([sys.executable] + argv)
    report(sock, path, ev="child", task=task, pid=os.getpid(), child=child.pid)
    while True:
        try:
            code = child.wait()
            break
        except KeyboardInterrupt:
            continue
    report(sock, path, ev="end", task=task, pid=os.getpid(), rc=code)
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
