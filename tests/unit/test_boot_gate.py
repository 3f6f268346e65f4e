"""spawner.BootGate: how many daemons boot at once, and every way a place comes back."""
from __future__ import annotations

import asyncio

from agentctl_swarm.spawner import BootGate


def test_gate_admits_limit_then_queues_and_releases_on_leave() -> None:
    async def scenario() -> list[str]:
        gate = BootGate(2, timeout=60)
        order: list[str] = []

        async def boot(name: str) -> None:
            await gate.enter(name)
            order.append(name)

        tasks = [asyncio.create_task(boot(n)) for n in ("a", "b", "c", "d")]
        await asyncio.sleep(0.05)
        assert order == ["a", "b"] and gate.booting == 2
        gate.leave("a")
        gate.leave("a")  # idempotent: a second leave must not admit two
        await asyncio.sleep(0.05)
        assert order == ["a", "b", "c"] and gate.booting == 2
        gate.leave("b")
        gate.leave("c")
        await asyncio.gather(*tasks)
        gate.leave("d")
        assert gate.booting == 0
        return order

    assert asyncio.run(scenario()) == ["a", "b", "c", "d"]


def test_a_slow_boot_gives_its_place_back_after_the_timeout() -> None:
    async def scenario() -> float:
        gate = BootGate(1, timeout=0.2)
        await gate.enter("cloning")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await asyncio.wait_for(gate.enter("next"), 5)
        return loop.time() - t0

    waited = asyncio.run(scenario())
    assert 0.15 <= waited < 2.0, waited


def test_restarting_the_same_slot_never_holds_two_places() -> None:
    async def scenario() -> int:
        gate = BootGate(2, timeout=60)
        await gate.enter("x")
        await gate.enter("x")  # the restarted daemon of the same slot
        await asyncio.wait_for(gate.enter("y"), 1)
        return gate.booting

    assert asyncio.run(scenario()) == 2
