"""A guided tour of agentctl-swarm: a small swarm on the embedded relay, real tasks, a crash, scaling.

Run it with ``make demo`` (or ``python examples/demo.py``). It uses a private HOME under
/tmp, so your own ~/.agentctl is never touched, and stops by itself (or on Ctrl-C).
The agent is the bundled fake ``claude`` (tests/fakes/fake_claude.py), which prints
realistic stream-json; set DEMO_AGENT="claude -p --output-format stream-json --verbose"
to run the real CLI instead (it needs ANTHROPIC_API_KEY or CLAUDE_CODE_OAUTH_TOKEN).
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.swarmlib import Swarm, base_config, fake_agent_command, swarm_processes  # noqa: E402


def say(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def show(swarm: Swarm, *args: str) -> None:
    print("$ agentctl " + " ".join(shlex.quote(a) for a in args), flush=True)
    print(swarm.cli(*args).stdout.rstrip(), flush=True)


def main() -> int:
    home = Path(tempfile.mkdtemp(prefix="agentctl-demo-"))
    agent = shlex.split(os.environ["DEMO_AGENT"]) if os.environ.get("DEMO_AGENT") else fake_agent_command()
    config = base_config(count=3, **{"heartbeat-interval": "5s", "agent": {"command": agent}})
    swarm = Swarm(home, config)
    signal.signal(signal.SIGINT, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        return tour(swarm, home)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the swarm", flush=True)
        return 130
    finally:
        swarm.stop()
        swarm.kill()
        left = swarm_processes(home)
        print(f"\nswarm stopped; processes left behind: {len(left)}; demo files in {home}", flush=True)


def tour(swarm: Swarm, home: Path) -> int:
    say(f"Starting a swarm of 3 daemons on the embedded relay (HOME={home})")
    swarm.start()
    show(swarm, "swarm", "status")

    say("Posting four tasks; the last one is told to fail")
    prompts = {"demo-1": "write a greeting [fake:slow:2]", "demo-2": "add tests [fake:slow:1]",
               "demo-3": "review [fake:success]", "demo-4": "something impossible [fake:fail]"}
    for task_id, prompt in prompts.items():
        swarm.add_task(prompt, task_id)
        print(f"$ agentctl task add {shlex.quote(prompt)} --id {task_id}", flush=True)
    seen: dict[str, str] = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for task_id, task in swarm.tasks().items():
            if seen.get(task_id) != task["state"]:
                seen[task_id] = task["state"]
                print(f"  {task_id}: {task['state']:<9} {task['agent'] or ''} {task['reason']}", flush=True)
        if all(state in ("done", "failed", "blocked") for state in seen.values()) and len(seen) == 4:
            break
        time.sleep(0.2)
    show(swarm, "task", "list")

    victim = swarm.agents()["swarm-general-002"]
    say(f"Killing {victim['name']} (pid {victim['pid']}) with SIGKILL: the supervisor restarts it after 1 s")
    os.kill(victim["pid"], signal.SIGKILL)
    swarm.wait_for(lambda: swarm.agents()["swarm-general-002"]["pid"] not in (None, victim["pid"])
                   and swarm.agents()["swarm-general-002"]["connected"], 20, "the restart")
    show(swarm, "swarm", "status")

    say("Scaling up to 5 daemons, then down to 2 (idle ones go first, active ones never)")
    show(swarm, "swarm", "scale", "5")
    swarm.wait_for(lambda: len(swarm.agents()) == 5, 20, "5 daemons")
    show(swarm, "swarm", "scale", "2")
    swarm.wait_for(lambda: len(swarm.agents()) == 2, 20, "2 daemons")
    show(swarm, "swarm", "status")

    say("The supervisor's log (JSON lines in ~/.agentctl/logs/supervisor.log), last lines")
    print("\n".join(swarm.cli("swarm", "logs").stdout.splitlines()[-8:]), flush=True)
    say("Stopping the swarm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
