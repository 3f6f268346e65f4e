"""A hostile "agent command": tries to escape its sandbox and reports what worked.

Prints one JSON object {attempt: "ok" | "denied: <errno name>"} on stdout and
exits 0. Stdlib only, no site import needed (it runs as ``python -I -S`` under
the sandbox, possibly as an unprivileged user with the system interpreter).
Escape attempts are named ``escape_*``; legitimate actions ``legit_*``.

``--swarm`` mode is the agent command of a real swarm (tests/integration/
test_isolation_swarm.py): the session's argv ends with the task prompt, whose
``key=value`` words name what only the test knows (the supervisor's pid, the
daemons' pids, a granted secret file). The workspace is the cwd, the private tmp
is ``$TMPDIR``; instead of one planted descriptor every open descriptor above 2
is reported and tried. It prints one stream-json-shaped line per attempt
(``{"type": "escape", "attempt": ..., "outcome": ...}``; the daemon logs every
stdout line) and ends with a ``result`` line, so the task is DONE.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import subprocess
import sys
from typing import Callable


def _outcome(action: Callable[[], object]) -> str:
    try:
        action()
    except OSError as exc:
        return f"denied: {errno.errorcode.get(exc.errno or 0, str(exc.errno))}"
    except subprocess.CalledProcessError as exc:
        return f"denied: exit {exc.returncode}"
    return "ok"


def _read(path: str) -> Callable[[], bytes]:
    def go() -> bytes:
        with open(path, "rb") as f:
            return f.read()
    return go


def _write(path: str) -> Callable[[], None]:
    def go() -> None:
        with open(path, "w") as f:
            f.write("escaped\n")
    return go


def _connect(path: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)


def _raw_socket() -> None:
    socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()


def _git_version() -> None:
    subprocess.run(["git", "--version"], check=True, stdout=subprocess.DEVNULL, timeout=10)


def _symlink_read(workspace: str, target: str) -> Callable[[], bytes]:
    link = os.path.join(workspace, "innocent-link")
    def go() -> bytes:
        if not os.path.lexists(link):
            os.symlink(target, link)
        return _read(link)()
    return go


def _hardlink(workspace: str, target: str) -> Callable[[], bytes]:
    def go() -> bytes:
        dest = os.path.join(workspace, "innocent-hardlink")
        os.link(target, dest)
        return _read(dest)()
    return go


def _rename_out(workspace: str, home: str) -> Callable[[], None]:
    def go() -> None:
        src = os.path.join(workspace, "to-move")
        _write(src)()
        os.rename(src, os.path.join(home, "moved-out"))
    return go


def attempts(a: argparse.Namespace) -> dict[str, Callable[[], object]]:
    """Every attempt, in order; the leaked descriptor goes first, before we open anything."""
    home, ws, sib = a.plant_home, a.workspace, a.sibling
    return {
        "escape_leaked_fd": lambda: os.read(a.leaked_fd, 64),
        "escape_read_ssh_key": _read(f"{home}/.ssh/id_ed25519"),
        "escape_read_aws_credentials": _read(f"{home}/.aws/credentials"),
        "escape_read_sibling_context": _read(f"{sib}/context.md"),
        "escape_read_sibling_identity": _read(a.sibling_identity),
        "escape_list_sibling": lambda: os.listdir(sib),
        "escape_read_state": _read(f"{a.state_dir}/tasks.json"),
        "escape_write_home": _write(f"{home}/escaped.txt"),
        "escape_write_var_tmp": _write(f"/var/tmp/{a.tag}"),
        "escape_write_shared_tmp": _write(f"/tmp/{a.tag}"),
        "escape_rename_out": _rename_out(ws, home),
        "escape_symlink_to_key": _symlink_read(ws, f"{home}/.ssh/id_ed25519"),
        "escape_hardlink_key": _hardlink(ws, f"{home}/.ssh/id_ed25519"),
        "escape_read_supervisor_environ": _read(f"/proc/{a.supervisor_pid}/environ"),
        "escape_signal_supervisor": lambda: os.kill(a.supervisor_pid, 0),
        "escape_connect_control_socket": lambda: _connect(a.control_socket),
        "escape_raw_socket": _raw_socket,
        "legit_write_workspace": _write(f"{ws}/result.txt"),
        "legit_write_private_tmp": _write(f"{a.private_tmp}/scratch.txt"),
        "legit_read_usr_bin_env": _read("/usr/bin/env"),
        "legit_git_version": _git_version,
    }


# ---------------------------------------------------------------- swarm mode

def _prompt_words(prompt: str) -> dict[str, str]:
    return dict(w.split("=", 1) for w in prompt.split() if "=" in w)


def _open_fds() -> dict[int, str]:
    """Descriptors above 2 and what they point at (the listing's own fd is gone by then)."""
    found: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            try:
                found[fd] = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
    return found


def _use_fds() -> None:
    """Any descriptor above 2 is a leak; try to use it (read, or recv on a socket)."""
    fds = _open_fds()
    if not fds:
        raise OSError(errno.EBADF, "no descriptor above 2 is open")
    for fd, target in fds.items():
        if target.startswith("socket:"):
            with socket.socket(fileno=os.dup(fd)) as s:
                s.setblocking(False)
                try:
                    s.recv(1)
                except BlockingIOError:
                    pass
        else:
            os.read(fd, 1)


def _control(path: str, cmd: str, args: dict) -> None:
    """One request on the control socket; refused or failing commands raise."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(json.dumps({"cmd": cmd, "args": args}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    reply = json.loads(data or b"{}")
    if not reply.get("ok"):
        raise OSError(errno.EACCES, str(reply.get("error", "no reply"))[:200])


def _orphan_control(path: str, cmd: str, args: dict) -> Callable[[], None]:
    """Double-fork and setsid, so the requester is neither a descendant of its daemon
    nor in its daemon's or session's session; the grandchild reports through a pipe."""
    def go() -> None:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            os.setsid()
            if os.fork() == 0:
                import time
                time.sleep(0.3)  # let the intermediate exit: reparented to the subreaper
                os.write(w, _outcome(lambda: _control(path, cmd, args)).encode())
                os._exit(0)
            os._exit(0)
        os.close(w)
        os.waitpid(pid, 0)
        with os.fdopen(r, "rb") as f:
            outcome = f.read().decode() or "denied: no answer"
        if outcome != "ok":
            raise OSError(errno.EACCES, outcome)
    return go


def _list_others(base: str, me: str) -> None:
    """Listing the workspaces' parent is an escape only if it shows another agent
    (under bwrap the parent is a tmpfs skeleton holding just our own mount point)."""
    if not set(os.listdir(base)) - {me}:
        raise OSError(errno.ENOENT, "only its own workspace is visible")


def _pids(text: str) -> list[int]:
    return [int(p) for p in text.split(",") if p]


def _kill_probe(pids: list[int]) -> None:
    for pid in pids:
        os.kill(pid, 0)


def _read_environs(pids: list[int]) -> None:
    for pid in pids:
        _read(f"/proc/{pid}/environ")()


def swarm_attempts(a: argparse.Namespace, words: dict[str, str]) -> dict[str, Callable[[], object]]:
    """The swarm-mode attempts, in order: the leaked descriptors first, control socket last."""
    home, ws, tmp = a.plant_home, os.getcwd(), os.environ.get("TMPDIR", "")
    me = os.path.basename(ws)
    sib = next((os.path.join(a.workspace_base, n) for n in a.agents.split(",") if n != me), "")
    sup, daemons = int(words.get("supervisor", "0")), _pids(words.get("daemons", ""))
    sock, tag = a.control_socket, words.get("tag", "x")
    attempts = {
        "escape_leaked_fd": _use_fds,
        "escape_read_ssh_key": _read(f"{home}/.ssh/id_ed25519"),
        "escape_read_aws_credentials": _read(f"{home}/.aws/credentials"),
        "escape_read_sibling_context": _read(f"{sib}/context.md"),
        "escape_read_sibling_identity": _read(f"{sib}/.agentchat/identities/{os.path.basename(sib)}.json"),
        "escape_list_sibling": lambda: os.listdir(sib),
        "escape_list_workspace_base": lambda: _list_others(a.workspace_base, me),
        "escape_read_state": _read(f"{a.state_dir}/tasks.json"),
        "escape_read_supervisor_log": _read(f"{os.path.dirname(a.state_dir)}/logs/supervisor.log"),
        "escape_write_home": _write(f"{home}/escaped-{tag}.txt"),
        "escape_write_shared_tmp": _write(f"/tmp/escaped-{tag}.txt"),
        "escape_rename_out": _rename_out(ws, home),
        "escape_planted_symlink": _read(f"{ws}/planted-link"),
        "escape_symlink_to_key": _symlink_read(ws, f"{home}/.ssh/id_ed25519"),
        "escape_hardlink_key": _hardlink(ws, f"{home}/.ssh/id_ed25519"),
        "escape_read_supervisor_environ": _read(f"/proc/{sup}/environ"),
        "escape_read_daemon_environ": lambda: _read_environs(daemons),
        "escape_signal_supervisor": lambda: os.kill(sup, 0),
        "escape_signal_daemons": lambda: _kill_probe(daemons),
        "legit_write_workspace": _write(f"{ws}/result.txt"),
        "legit_write_private_tmp": _write(f"{tmp}/scratch.txt"),
        "legit_read_usr_bin_env": _read("/usr/bin/env"),
    }
    if words.get("secret"):
        attempts["granted_secret_file"] = _read(os.path.join(ws, words["secret"]))
    attempts["escape_control_status"] = lambda: _control(sock, "status", {})
    attempts["escape_control_task_add"] = lambda: _control(
        sock, "task-add", {"prompt": "planted by a session", "role": "any", "id": f"pwned-{tag}"})
    attempts["escape_control_orphan_task_add"] = _orphan_control(
        sock, "task-add", {"prompt": "planted by an orphan", "role": "any", "id": f"orphan-{tag}"})
    attempts["escape_control_stop"] = lambda: _control(sock, "stop", {})
    return attempts


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def swarm_main(args: argparse.Namespace) -> None:
    words = _prompt_words(args.prompt or "")
    _emit({"type": "system", "subtype": "init", "session_id": "escape", "tools": [],
           "model": "escape-agent"})
    _emit({"type": "escape", "attempt": "env_names", "outcome": sorted(os.environ)})
    _emit({"type": "escape", "attempt": "open_fds", "outcome": {str(k): v for k, v in _open_fds().items()}})
    escaped = []
    for name, action in swarm_attempts(args, words).items():
        outcome = _outcome(action)
        if name.startswith("escape_") and outcome == "ok":
            escaped.append(name)
        _emit({"type": "escape", "attempt": name, "outcome": outcome})
    _emit({"type": "result", "subtype": "success", "is_error": False, "num_turns": 1,
           "session_id": "escape", "total_cost_usd": 0.0, "result": f"escaped: {escaped or 'none'}",
           "usage": {"input_tokens": 1, "output_tokens": 1, "cache_creation_input_tokens": 0,
                     "cache_read_input_tokens": 0}})


def main() -> None:
    if "--swarm" in sys.argv[1:]:
        p = argparse.ArgumentParser()
        p.add_argument("--swarm", action="store_true")
        for flag in ("--plant-home", "--state-dir", "--control-socket", "--workspace-base", "--agents"):
            p.add_argument(flag, required=True)
        p.add_argument("prompt", nargs="?", default="")
        swarm_main(p.parse_args())
        return
    p = argparse.ArgumentParser()
    for flag in ("--plant-home", "--workspace", "--sibling", "--sibling-identity", "--state-dir",
                 "--control-socket", "--private-tmp", "--tag"):
        p.add_argument(flag, required=True)
    p.add_argument("--leaked-fd", type=int, required=True)
    p.add_argument("--supervisor-pid", type=int, required=True)
    args = p.parse_args()
    report = {name: _outcome(action) for name, action in attempts(args).items()}
    json.dump(report, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
