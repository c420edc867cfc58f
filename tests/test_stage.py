"""The stage lifecycle without servers: supervision ends everything at the first end, and says why."""

from __future__ import annotations

import asyncio

import pytest

from plumbing.stage import Stage, StageEnded, Supervised


class _Toy:
    def __init__(self, fail_after: float | None = None) -> None:
        self._stop = asyncio.Event()
        self._ready = asyncio.Event()
        self.fail_after = fail_after
        self.stopped = False

    @property
    def ready(self) -> asyncio.Event:
        return self._ready

    def stop(self) -> None:
        self.stopped = True
        self._stop.set()

    async def run(self) -> None:
        self._ready.set()
        if self.fail_after is not None:
            await asyncio.sleep(self.fail_after)
            raise ConnectionError("follower lost its broker")
        await self._stop.wait()


def test_toys_are_stages() -> None:
    assert isinstance(_Toy(), Stage)


async def test_an_embedded_stage_that_fails_stops_the_main_one_loudly() -> None:
    main, router = _Toy(), _Toy(fail_after=0.05)
    with pytest.raises(StageEnded, match="follower lost its broker") as err:
        await asyncio.wait_for(Supervised(main, [router]).run(), 5)
    assert main.stopped and isinstance(err.value.__cause__, ConnectionError)


async def test_stopping_the_main_stage_stops_the_embedded_ones_cleanly() -> None:
    main, deferral = _Toy(), _Toy()
    sup = Supervised(main, [deferral])
    task = asyncio.create_task(sup.run())
    await asyncio.wait_for(sup.ready.wait(), 5)
    sup.stop()
    await asyncio.wait_for(task, 5)  # no error: asked to stop
    assert deferral.stopped


async def test_the_main_stages_own_failure_is_raised_as_it_is() -> None:
    main = _Toy(fail_after=0.01)
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(Supervised(main, [_Toy()]).run(), 5)


async def test_the_main_job_notices_a_dead_stage_at_once_not_after_the_next_step() -> None:
    from primerl.rl_loop import _next_step

    class _Learner:
        history: list = []
        version_published = asyncio.Condition()

    async def dies() -> None:
        await asyncio.sleep(0.05)
        raise RuntimeError("verifier crashed")

    dead = asyncio.create_task(dies(), name="verifier")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(RuntimeError, match="verifier") as err:
        await _next_step(_Learner(), 0, [dead], timeout_s=60)  # type: ignore[arg-type]
    assert loop.time() - t0 < 5 and "verifier crashed" in str(err.value.__cause__)
