"""A daemon stops on SIGTERM and SIGINT, whichever of its threads the kernel picks.

The daemon installs its handlers without ``loop.add_signal_handler`` (whose enum
conversions cost each forked daemon 0.3 MB): a wake-up socket the loop watches,
written by the C-level handler, and a Python-level handler that hands the stop
to the loop. Each case runs in a fresh interpreter (signal state is process-wide).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = """
    import asyncio, json, logging, signal, socket, sys, threading, time
    from agentctl_swarm.daemon import Daemon
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    async def main(sig, other_thread):
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        daemon = Daemon(theirs)
        daemon._stopped = loop.create_future()
        daemon._catch_stop_signals(loop)
        if other_thread:  # the kernel may deliver to any thread that does not block it
            worker = threading.Thread(target=time.sleep, args=(3,), daemon=True)
            worker.start()
            loop.call_later(0.2, signal.pthread_kill, worker.ident, sig)
        else:
            loop.call_later(0.2, signal.raise_signal, sig)
        t0 = time.monotonic()
        code = await asyncio.wait_for(daemon._stopped, 10)
        waited = time.monotonic() - t0
        await daemon._shutdown()
        print(json.dumps({"code": code, "waited": waited,
                          "handler_after": signal.getsignal(sig) == signal.SIG_DFL,
                          "wakeup_fd_after": signal.set_wakeup_fd(-1)}))

    asyncio.run(main(signal.Signals[sys.argv[1]], sys.argv[2] == "thread"))
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("where", ["main", "thread"])
def test_a_stop_signal_stops_the_daemon_and_shutdown_restores_the_defaults(sig: str, where: str) -> None:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT), sig, where],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["code"] == 0
    assert seen["waited"] < 2.0  # woken by the signal, not by the 3 s sleep ending
    assert seen["handler_after"] and seen["wakeup_fd_after"] == -1
    assert f"stopping ({sig})" in out.stderr  # the daemon's log line: the reason is right
