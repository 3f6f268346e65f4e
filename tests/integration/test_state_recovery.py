"""State survives faults (issue 5): corrupt state files at start never stop the swarm.

Each state file (tasks, budget, desired count, restart history) is planted
truncated, as garbage or as valid JSON of the wrong shape before a real swarm
starts. The swarm must start and run a task, a file that could not be read must
be moved aside (``<name>.json.corrupt-<stamp>``) with one clear log line, and the
supervisor must never print a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.swarmlib import Swarm, base_config

NAMES = ("tasks", "budget", "desired", "restarts")
TIMEOUT = 60.0
GOOD = {
    "tasks": {"version": 1, "tasks": [{"id": "kept", "role": "any", "prompt": "kept [fake:success]",
                                       "state": "queued", "created": 1.0}]},
    "budget": {"used": 1000, "cost_usd": 0.5, "limit": None, "quota_paused": False},
    "desired": {"count": 1, "config_count": 1},
    "restarts": {},
}
CORRUPT = {
    "truncated": {n: json.dumps(GOOD[n])[: len(json.dumps(GOOD[n])) // 2] for n in NAMES},
    "garbage": {n: "\x00\xff not json at all \ufffd" for n in NAMES},
    "empty": {n: "" for n in NAMES},
    "deep": {n: "[" * 50000 for n in NAMES},
}


def plant(home: Path, contents: dict[str, str | bytes]) -> Path:
    state = home / ".agentctl" / "state"
    state.mkdir(parents=True, exist_ok=True)
    for name, text in contents.items():
        data = text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")
        (state / f"{name}.json").write_bytes(data)
    return state


def log_lines(swarm: Swarm) -> list[dict[str, Any]]:
    path = swarm.home / ".agentctl" / "logs" / "supervisor.log"
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_no_traceback(swarm: Swarm) -> None:
    out = swarm.log_path.read_text(errors="replace")
    assert "Traceback" not in out, out[-3000:]
    assert not [e for e in log_lines(swarm) if "Traceback" in json.dumps(e)]


@pytest.mark.parametrize("kind", sorted(CORRUPT))
def test_corrupt_state_files_are_moved_aside_and_the_swarm_starts(tmp_path: Path, kind: str) -> None:
    home = tmp_path / "home"
    state = plant(home, CORRUPT[kind])
    with Swarm(home, base_config(count=1, **{"workspace-base": str(home / "ws")})) as swarm:
        swarm.start(timeout=TIMEOUT)
        for name in NAMES:
            aside = sorted(state.glob(f"{name}.json.corrupt-*"))
            assert aside, f"{name}.json was not moved aside ({kind})"
            lines = [e["msg"] for e in log_lines(swarm)
                     if f"{name}.json: corrupt" in e["msg"] and str(aside[0]) in e["msg"]]
            assert lines, f"no clear log line for {name}.json"
        swarm.add_task("after recovery [fake:success]", "after")
        assert swarm.wait_tasks(["after"], timeout=TIMEOUT)["after"]["state"] == "done"
        budget = swarm.status()["supervisor"]["budget"]
        assert budget["used"] > 0 and budget["quota_paused"] is False
        assert swarm.stop() == 0
    assert_no_traceback(swarm)
    for name in ("tasks", "budget"):  # rewritten, valid
        json.loads((state / f"{name}.json").read_text())


WRONG_SHAPE = {
    "tasks": json.dumps({"version": 1, "tasks": [
        GOOD["tasks"]["tasks"][0],  # recoverable
        {"id": "../../etc/passwd", "role": "any", "prompt": "x", "state": "queued"},
        {"id": "bad-state", "role": "any", "prompt": "x", "state": "exploded"},
        {"id": "bad-role", "role": "root", "prompt": "x", "state": "queued"},
        {"id": "bad-types", "role": "any", "prompt": ["x"], "state": "queued", "attempts": "many"},
        {"id": 7}, "just a string", None, [1, 2]]}),
    "budget": json.dumps({"used": -5, "cost_usd": "lots", "quota_paused": "yes"}),
    "desired": json.dumps({"count": 10**9, "config_count": 1}),
    "restarts": json.dumps({"swarm-general-001": {"starts": "x"}, "other": 5}),
}


def test_wrong_shapes_keep_what_can_be_recovered(tmp_path: Path) -> None:
    home = tmp_path / "home"
    plant(home, WRONG_SHAPE)
    with Swarm(home, base_config(count=1, **{"workspace-base": str(home / "ws")})) as swarm:
        snap = swarm.start(timeout=TIMEOUT).status()
        assert snap["supervisor"]["desired"] == 1, "an absurd saved count was trusted"
        tasks = swarm.wait_tasks(["kept"], timeout=TIMEOUT)
        assert set(tasks) == {"kept"}, f"invalid records were loaded: {sorted(tasks)}"
        budget = swarm.status()["supervisor"]["budget"]
        assert (budget["used"], budget["quota_paused"]) == (tasks["kept"]["tokens"], False), budget
        assert swarm.stop() == 0
    assert_no_traceback(swarm)


def test_a_state_file_that_is_a_directory_or_unreadable(tmp_path: Path) -> None:
    home = tmp_path / "home"
    state = plant(home, {})
    (state / "tasks.json").mkdir()
    (state / "budget.json").symlink_to(state / "nowhere")
    with Swarm(home, base_config(count=1, **{"workspace-base": str(home / "ws")})) as swarm:
        swarm.start(timeout=TIMEOUT)
        swarm.add_task("works [fake:success]", "works")
        assert swarm.wait_tasks(["works"], timeout=TIMEOUT)["works"]["state"] == "done"
        assert swarm.stop() == 0
    assert_no_traceback(swarm)
    assert sorted(state.glob("tasks.json.corrupt-*")), "the directory in the way was not moved aside"
