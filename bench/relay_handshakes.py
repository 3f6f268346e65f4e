"""Embedded relay throughput: handshakes/s and fan-out frames/s for N clients.

Run: python bench/relay_handshakes.py [N ...]   (default: 100 500)
Relay and clients share one process and event loop, so the figures are a lower
bound for the relay alone; the clients' Ed25519 signing is included.
"""
from __future__ import annotations

import asyncio
import sys
import time

from agentctl_swarm.agentchat.client import AgentChatClient
from agentctl_swarm.agentchat.identity import Identity
from agentctl_swarm.agentchat.relay import Relay


async def measure(n: int, rounds: int = 20) -> tuple[float, float]:
    relay = Relay(rate_limit=0)
    await relay.start()
    received = 0
    done = asyncio.Event()

    def on_message(msg: dict) -> None:
        nonlocal received
        received += 1
        if received >= (n - 1) * rounds:
            done.set()

    idents = [Identity.generate(f"bench-{i:04d}") for i in range(n)]
    clients = [AgentChatClient(relay.url, ident, ["#agents"], on_message=on_message,
                               send_interval=0.0) for ident in idents]
    start = time.perf_counter()
    tasks = [asyncio.create_task(c.run()) for c in clients]
    await asyncio.gather(*(c.wait_connected(60) for c in clients))
    handshake_s = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(rounds):
        clients[0].send("#agents", f"fan-out {i}")
    await asyncio.wait_for(done.wait(), 120)
    fanout_s = time.perf_counter() - start
    for client in clients:
        await client.close()
    await asyncio.gather(*tasks)
    await relay.stop()
    return n / handshake_s, relay.stats()["frames_fanned_out"] / fanout_s


def main(argv: list[str]) -> int:
    sizes = [int(a) for a in argv] or [100, 500]
    print(f"{'clients':>8} {'handshakes/s':>14} {'fan-out frames/s':>18}")
    for n in sizes:
        hs, fan = asyncio.run(measure(n))
        print(f"{n:>8} {hs:>14.0f} {fan:>18.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
