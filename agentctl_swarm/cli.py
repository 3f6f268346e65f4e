"""``agentctl``: the command line. Every error a person can cause is one line and a non-zero exit.

Exit codes: 0 success, 1 error, 2 usage, 3 the swarm is not running (as ``systemctl status``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .errors import SwarmError
from .paths import SwarmPaths

EXIT_ERROR, EXIT_USAGE, EXIT_NOT_RUNNING = 1, 2, 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentctl", description="Run a swarm of AI coding agents.")
    top = parser.add_subparsers(dest="group", required=True, metavar="{swarm,task}")
    swarm = top.add_parser("swarm", help="start, stop and inspect the swarm").add_subparsers(
        dest="cmd", required=True, metavar="COMMAND")
    start = swarm.add_parser("start", help="run the supervisor in the foreground")
    start.add_argument("--count", type=int, help="number of daemons (overrides the config)")
    start.add_argument("--config", type=Path, help="config file (default ~/.agentctl/swarm.yaml)")
    stop = swarm.add_parser("stop", help="stop the running swarm")
    stop.add_argument("--no-wait", action="store_true", help="return without waiting for the stop")
    status = swarm.add_parser("status", help="show the supervisor and every agent")
    status.add_argument("--json", action="store_true", help="one JSON object")
    scale = swarm.add_parser("scale", help="change the number of daemons (0 stops the swarm)")
    scale.add_argument("count", type=int)
    logs = swarm.add_parser("logs", help="show the supervisor's or one agent's log")
    logs.add_argument("agent", nargs="?")
    logs.add_argument("-f", "--follow", action="store_true")
    swarm.add_parser("reload", help="re-read the config (as SIGHUP)")
    unit = swarm.add_parser("install-unit", help="install the systemd user unit for this copy")
    unit.add_argument("--force", action="store_true", help="overwrite an existing unit file")
    check = swarm.add_parser("check-config", help="validate the config and exit")
    check.add_argument("--config", type=Path)

    task = top.add_parser("task", help="post and follow tasks").add_subparsers(
        dest="cmd", required=True, metavar="COMMAND")
    add = task.add_parser("add", help="post a task")
    add.add_argument("prompt")
    add.add_argument("--role", default="any", help="builder, auditor, qa, general or any")
    add.add_argument("--id", help="task id (default: generated)")
    add.add_argument("--json", action="store_true")
    tlist = task.add_parser("list", help="list tasks")
    tlist.add_argument("--json", action="store_true")
    tlist.add_argument("--all", action="store_true", help="include archived (older finished) tasks")
    cancel = task.add_parser("cancel", help="cancel a task")
    cancel.add_argument("id")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    paths = SwarmPaths.for_home()
    try:
        return dispatch(args, paths)
    except SwarmError as exc:
        print(f"agentctl: {exc}", file=sys.stderr)
        return EXIT_NOT_RUNNING if type(exc).__name__ == "NotRunning" else EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def dispatch(args: argparse.Namespace, paths: SwarmPaths) -> int:
    handler = globals().get(f"cmd_{args.group}_{args.cmd.replace('-', '_')}")
    assert handler is not None, args.cmd
    return int(handler(args, paths))


def _call(paths: SwarmPaths, cmd: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    from .control.client import call
    reply = call(paths.control_socket, cmd, args)
    if not reply.get("ok"):
        raise SwarmError(str(reply.get("error", "failed")))
    return reply


def cmd_swarm_start(args: argparse.Namespace, paths: SwarmPaths) -> int:
    from .system.pidfile import PidFile
    if args.count is not None and not 0 < args.count <= 5000:
        raise SwarmError(f"--count: expected 1 to 5000, got {args.count}")
    paths.ensure()
    pidfile = PidFile(paths.pidfile)
    pidfile.acquire()  # a second start is refused before it starts anything
    prestarted = None
    try:
        # The fork-server (the default spawn mode) is forked from this process first,
        # so that its ~0.3 s preload overlaps importing and loading the config (which
        # it does not need) and the supervisor; with "spawn: exec" or a bad config it
        # is killed at once.
        from . import forkserver as forkserver_module
        try:
            prestarted = forkserver_module.prestart()
        except OSError:  # no fork now (EAGAIN): the supervisor starts it later, or execs daemons
            pass
        from .config import load_config
        config = load_config(args.config)
        forkserver = None
        if prestarted is not None and config.spawn == "fork-server":
            from .spawner import ForkServerClient
            forkserver = ForkServerClient.adopt(*prestarted)
        elif prestarted is not None:
            _discard_forkserver(*prestarted)
        prestarted = None
        from .supervisor import run_supervisor
    except BaseException:
        if prestarted is not None:
            _discard_forkserver(*prestarted)
        pidfile.release()
        raise
    return run_supervisor(config, paths=paths, config_arg=args.config, count_override=args.count,
                          pidfile=pidfile, forkserver=forkserver)


def _discard_forkserver(pid: int, sock: Any) -> None:
    import os
    import signal
    sock.close()
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)


def cmd_swarm_check_config(args: argparse.Namespace, paths: SwarmPaths) -> int:
    from .config import load_config
    config = load_config(args.config)
    print(f"{config.source or 'built-in defaults'}: ok ({config.count} daemons)")
    return 0


def cmd_swarm_stop(args: argparse.Namespace, paths: SwarmPaths) -> int:
    from .system.pidfile import running_pid
    reply = _call(paths, "stop")
    print(reply.get("message", "stopping"))
    pid = running_pid(paths.pidfile)
    deadline = time.monotonic() + 60
    while not args.no_wait and pid and running_pid(paths.pidfile) and time.monotonic() < deadline:
        time.sleep(0.1)
    if not args.no_wait and running_pid(paths.pidfile):
        raise SwarmError(f"the swarm (pid {pid}) is still stopping after 60s")
    return 0


def cmd_swarm_status(args: argparse.Namespace, paths: SwarmPaths) -> int:
    reply = _call(paths, "status")
    reply.pop("ok", None)
    if args.json:
        print(json.dumps(reply, indent=2))
        return 0
    print(format_status(reply))
    return 0


def format_status(snap: dict[str, Any]) -> str:
    sup = snap["supervisor"]
    lines = [f"supervisor pid {sup['pid']}, up {sup['uptime_s']:.0f}s, relay {sup['agentchat_server']}, "
             f"{len(snap['agents'])}/{sup['desired']} daemons, max-active {sup['max_active']}",
             f"budget: {_budget(sup['budget'])}; memory: {sup['memory_enforcement']}; "
             f"sandbox: {sup['sandbox']}"]
    if sup.get("paused"):
        lines.append(f"PROMOTIONS PAUSED: {sup['paused']}")
    lines.append(f"{'AGENT':<24} {'STATUS':<10} {'PID':>7} {'RESTARTS':>8} {'HB AGE':>7} {'RSS MB':>7}  TASK")
    for a in snap["agents"]:
        task = a["task"] or ""
        if task and a.get("task_elapsed_s") is not None:
            task = f"{task} ({a['task_elapsed_s']:.0f}s)"
        note = a.get("degraded_reason") or a.get("link_problem") or ""
        lines.append(f"{a['name']:<24} {a['status']:<10} {a['pid'] or '-':>7} {a['restarts']:>8} "
                     f"{_num(a['last_heartbeat_age_s']):>7} {_num(a['rss_mb']):>7}  {task} {note}".rstrip())
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _budget(b: dict[str, Any]) -> str:
    limit = "unlimited" if b["limit"] is None else str(b["limit"])
    return f"{b['used']}/{limit} tokens, ${b['cost_usd']:.2f}"


def cmd_swarm_scale(args: argparse.Namespace, paths: SwarmPaths) -> int:
    print(_call(paths, "scale", {"count": args.count})["message"])
    return 0


def cmd_swarm_reload(args: argparse.Namespace, paths: SwarmPaths) -> int:
    reply = _call(paths, "reload")
    print("config reloaded: " + (", ".join(reply["changes"]) or "no changes"))
    return 0


def cmd_swarm_logs(args: argparse.Namespace, paths: SwarmPaths) -> int:
    """The journal when the running swarm is a systemd service (user or system), else the files."""
    from .system.journal import current_unit, read_logs
    from .system.pidfile import running_pid
    pid = running_pid(paths.pidfile)
    found = current_unit(pid) if pid else None
    if found is None or not found[0].startswith("agentctl-swarm"):
        return read_logs(args.agent, args.follow, log_dir=paths.log_dir, unit=None)
    unit, user_unit = found
    code = read_logs(args.agent, args.follow, log_dir=paths.log_dir, unit=unit, user_unit=user_unit)
    if code != 0 and not args.follow:  # e.g. a volatile journal a user may not read
        print(f"agentctl: the journal of {unit} is not readable here; showing the log files",
              file=sys.stderr)
        code = read_logs(args.agent, False, log_dir=paths.log_dir, unit=None)
    return code


def cmd_swarm_install_unit(args: argparse.Namespace, paths: SwarmPaths) -> int:
    from .unit import install_user_unit
    path = install_user_unit(force=args.force)
    print(f"installed {path}; now: systemctl --user daemon-reload && systemctl --user start agentctl-swarm")
    return 0


def cmd_task_add(args: argparse.Namespace, paths: SwarmPaths) -> int:
    task = _call(paths, "task-add", {"prompt": args.prompt, "role": args.role, "id": args.id})["task"]
    print(json.dumps(task) if args.json else f"task {task['id']} queued ({task['role']})")
    return 0


def cmd_task_list(args: argparse.Namespace, paths: SwarmPaths) -> int:
    tasks = _call(paths, "task-list", {"all": args.all})["tasks"]
    if args.json:
        print(json.dumps(tasks, indent=2))
        return 0
    print(f"{'ID':<20} {'ROLE':<8} {'STATE':<10} {'AGENT':<22} {'TOKENS':>8}  STARTED / FINISHED")
    for t in tasks:
        when = " / ".join(time.strftime("%H:%M:%S", time.localtime(x)) if x else "-"
                          for x in (t["started"], t["finished"]))
        print(f"{t['id']:<20} {t['role']:<8} {t['state']:<10} {t['agent'] or '-':<22} "
              f"{t['tokens']:>8}  {when} {t['reason']}".rstrip())
    return 0


def cmd_task_cancel(args: argparse.Namespace, paths: SwarmPaths) -> int:
    task = _call(paths, "task-cancel", {"id": args.id})["task"]
    print(f"task {task['id']}: {task['state']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
