"""The commands the CLI, the control socket and the signals share.

Each command takes the supervisor and a dict of arguments and returns
``{"ok": True, ...}`` or ``{"ok": False, "error": "<one line>"}``; arguments are
checked here, since the socket is a trust boundary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable, Callable

from ..coordinator import TaskError

if TYPE_CHECKING:
    from ..supervisor import Supervisor

MAX_COUNT = 5000
Command = Callable[["Supervisor", dict[str, Any]], Awaitable[dict[str, Any]]]


async def status(sup: "Supervisor", args: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True, **sup.snapshot()}


async def stop(sup: "Supervisor", args: dict[str, Any]) -> dict[str, Any]:
    sup.request_stop()
    return {"ok": True, "message": f"stopping swarm (pid {sup.pid})"}


async def scale(sup: "Supervisor", args: dict[str, Any]) -> dict[str, Any]:
    count = args.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= MAX_COUNT:
        return {"ok": False, "error": f"scale: expected a count from 0 to {MAX_COUNT}, got {count!r}"}
    if count == 0:
        sup.request_stop()
        return {"ok": True, "message": "scale 0: stopping the whole swarm"}
    before = sup.desired
    sup.set_desired(count)
    sup.call_soon(sup.manage_daemons)
    busy = sum(1 for s in sup.slots.values() if s.task_id)
    note = ""
    if count < len(sup.slots) and len(sup.slots) - busy < len(sup.slots) - count:
        note = "; active agents stop when their task ends"
    return {"ok": True, "message": f"scaling {before} -> {count}{note}", "desired": count}


async def reload(sup: "Supervisor", args: dict[str, Any]) -> dict[str, Any]:
    result = sup.reload()
    if not result["ok"]:
        return {"ok": False, "error": f"reload failed, old config kept: {result['error']}"}
    return {"ok": True, "changes": result["changes"]}


async def task_add(sup: "Supervisor", args: dict[str, Any]) -> dict[str, Any]:
    prompt, role, task_id = args.get("prompt"), args.get("role", "any"), args.get("id")
    if not isinstance(prompt, str) or not isinstance(role, str) or \
            not (task_id is None or isinstance(task_id, str)):
        return {"ok": False, "error": "task add: prompt, role and id must be strings"}
    try:
        record = sup.coordinator.add(prompt, role, task_id)
    except TaskError as exc:
        return {"ok": False, "error": str(exc)}
    return {"ok": True, "task": record.public()}


async def task_list(sup: "Supervisor", args: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True, "tasks": sup.coordinator.listing(include_archived=args.get("all") is True)}


async def task_cancel(sup: "Supervisor", args: dict[str, Any]) -> dict[str, Any]:
    task_id = args.get("id")
    if not isinstance(task_id, str):
        return {"ok": False, "error": "task cancel: expected a task id"}
    try:
        record = sup.coordinator.cancel(task_id)
    except TaskError as exc:
        return {"ok": False, "error": str(exc)}
    return {"ok": True, "task": record.public()}


async def ping(sup: "Supervisor", args: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True, "pid": sup.pid}


COMMANDS: dict[str, Command] = {
    "status": status, "stop": stop, "scale": scale, "reload": reload, "ping": ping,
    "task-add": task_add, "task-list": task_list, "task-cancel": task_cancel,
}


async def run(sup: "Supervisor", name: str, args: dict[str, Any]) -> dict[str, Any]:
    command = COMMANDS.get(name)
    if command is None:
        return {"ok": False, "error": f"unknown command {name[:40]!r}"}
    return await command(sup, args)
