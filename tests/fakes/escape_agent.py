"""A hostile "agent command": tries to escape its sandbox and reports what worked.

Prints one JSON object {attempt: "ok" | "denied: <errno name>"} on stdout and
exits 0. Stdlib only, no site import needed (it runs as ``python -I -S`` under
the sandbox, possibly as an unprivileged user with the system interpreter).
Escape attempts are named ``escape_*``; legitimate actions ``legit_*``.
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


def main() -> None:
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
