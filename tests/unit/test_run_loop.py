"""daemon.run_loop: asyncio.run's clean-up without its Runner (what a daemon runs under)."""

from __future__ import annotations

import asyncio

import pytest

from agentctl_swarm.daemon import run_loop


def test_returns_the_result_and_closes_the_loop() -> None:
    seen: list[asyncio.AbstractEventLoop] = []

    async def main() -> int:
        seen.append(asyncio.get_running_loop())
        return 7

    assert run_loop(main()) == 7
    assert seen[0].is_closed()


def test_an_exception_propagates_and_the_loop_still_closes() -> None:
    seen: list[asyncio.AbstractEventLoop] = []

    async def main() -> None:
        seen.append(asyncio.get_running_loop())
        raise LookupError("boom")

    with pytest.raises(LookupError, match="boom"):
        run_loop(main())
    assert seen[0].is_closed()


def test_tasks_left_behind_are_cancelled_and_unwound() -> None:
    unwound: list[str] = []

    async def lingering() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            unwound.append("lingering")

    async def main() -> None:
        asyncio.get_running_loop().create_task(lingering())
        await asyncio.sleep(0)

    run_loop(main())
    assert unwound == ["lingering"]


def test_async_generators_and_the_default_executor_are_shut_down() -> None:
    closed: list[str] = []
    threads: list[object] = []

    async def ticks():  # noqa: ANN202 - an async generator left suspended
        try:
            yield 1
            yield 2
        finally:
            closed.append("generator")

    async def main() -> None:
        gen = ticks()
        assert await gen.__anext__() == 1
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, lambda: None)
        threads.append(loop._default_executor)  # type: ignore[attr-defined]
        main.gen = gen  # type: ignore[attr-defined]  # kept alive past main

    run_loop(main())
    assert closed == ["generator"]
    assert threads[0]._shutdown  # type: ignore[attr-defined]


def test_an_error_in_a_left_task_is_reported_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    async def failing_on_cancel() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            raise RuntimeError("cleanup failed")

    async def main() -> str:
        asyncio.get_running_loop().create_task(failing_on_cancel())
        await asyncio.sleep(0)
        return "done"

    assert run_loop(main()) == "done"
    assert "unhandled exception during shutdown" in caplog.text and "cleanup failed" in caplog.text
