"""A short real-stack run whose metrics feed the guardrail (`make guardrail`) and the dashboard test.

    python -m perf.guardrail_run --out artifacts/guardrail_metrics.txt

perf/stack.py's processes on their own Tansu broker and redis-server: an engine (its
router embedded, speculation on, so the speculation gauges exist), a verifier, a
learner and an archiver. One arithmetic batch of GRPO groups goes in (four groups of
four: one learner step), plus one poison pill on rollout.prompts (so the dead-letter
path runs and its counters carry data); the run waits until every sample has an
outcome, the learner has published a policy and the engine has reloaded it (the
policy-lag, reward and reload-latency figures exist only then), then scrapes every
process's /metrics into one file (perf/scrape.py) and stops. The router is embedded in
the engine and every batch is one step: on 2 cores each process and each learner step
(~40-60 s) costs a large share of the run.

`ShortRun` is the same run as an async context manager, for a driver that watches the
processes while they run (tests/test_dashboard.py points a Prometheus at `targets()`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from perf.common import ARTIFACTS
from perf.scrape import fetch_pages, scrape, write_scrape
from perf.stack import Feeder, Observer, Stack, StackSettings, learner_consumed, policy_versions
from plumbing.config import Config
from plumbing.kafka import Publisher
from schemas.topics import PROMPTS

log = logging.getLogger(__name__)

POISON = b"\xc1guardrail poison pill: not a message"


@dataclass
class ShortRunSettings:
    """The shape of the run: small enough for 2 CPU cores, large enough for a learner step and a reload."""

    batches: int = 1
    prompts_per_batch: int = 4
    group_size: int = 4
    groups_per_step: int = 4
    max_tokens: int = 12
    poison_pills: int = 1
    speculation: bool = True
    settle_timeout_s: float = 240.0
    seed: int = 0


class ShortRun:
    """The stack of the module doc, started on enter and stopped on exit; `drive` feeds it."""

    def __init__(self, work_dir: Path, s: ShortRunSettings | None = None) -> None:
        self.s = s or ShortRunSettings()
        self.run_id = f"guardrail-{uuid.uuid4().hex[:6]}"
        self.stack = Stack(
            StackSettings(
                run_id=self.run_id,
                work_dir=work_dir,
                group_size=self.s.group_size,
                prompts_per_batch=self.s.prompts_per_batch,
                groups_per_step=self.s.groups_per_step,
                max_tokens=self.s.max_tokens,
                seed=self.s.seed,
                kinds=("engine", "verifier", "learner", "archiver"),
                extra_env={
                    "PRIMERL_ENGINE__SPECULATION": "true" if self.s.speculation else "false",
                    # Every step updates the policy (a group of equal rewards still trains),
                    # so a reload happens even when the untrained model scores all zeros.
                    "PRIMERL_LEARNER__FILTER_ZERO_VARIANCE": "false",
                },
            )
        )
        self.cfg: Config | None = None
        self.observer: Observer | None = None
        self.timings: dict[str, float] = {}

    async def __aenter__(self) -> ShortRun:
        t0 = time.monotonic()
        try:
            self.cfg = await self.stack.start_servers()
            await self.stack.start_stages()
            self.observer = Observer(self.cfg, self.run_id)
            await self.observer.start()
        except BaseException:
            await self._stop()
            raise
        self.timings["start_s"] = round(time.monotonic() - t0, 1)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stop()

    async def _stop(self) -> None:
        t0 = time.monotonic()
        if self.observer is not None:
            await self.observer.stop()
        # At once rather than one after another (Stack.stop_all): the engine's shutdown and
        # the learner's checkpoint take seconds each. The archiver last, as stop_all does.
        first = [st for kind, st in self.stack.stages.items() if kind != "archiver"]
        await asyncio.gather(*(asyncio.to_thread(st.stop) for st in first))
        await asyncio.to_thread(self.stack.stop_all)  # the archiver; the others are stopped already
        await asyncio.to_thread(self.stack.stop_servers)
        self.timings["stop_s"] = round(time.monotonic() - t0, 1)

    def targets(self) -> dict[str, str]:
        """Process name -> /metrics URL of every stage."""
        return self.stack.metrics_targets()

    async def _reloads(self) -> float:
        """Weight reloads the engine has done (its reload histogram's count)."""
        url = self.targets().get("engine")
        if url is None:
            return 0.0
        page = (await fetch_pages({"engine": url}))["engine"]
        for fam in text_string_to_metric_families(page):
            for sample in fam.samples:
                if sample.name == "primerl_engine_reload_seconds_count":
                    return float(sample.value)
        return 0.0

    async def drive(self) -> dict[str, Any]:
        """Feed the batches and the poison pills; return once everything settled (or at the timeout)."""
        assert self.cfg is not None and self.observer is not None
        t0 = time.monotonic()
        feeder = Feeder(self.cfg, self.stack.s, self.stack.outcomes_path, self.observer)
        target = self.s.batches * feeder.per_batch
        async with Publisher(self.cfg) as pub:
            for i in range(self.s.poison_pills):
                await pub.publish_raw(PROMPTS.name, POISON, key=f"poison-{i}".encode())
        await feeder.run(target, asyncio.Event())
        settled = False
        while time.monotonic() - t0 < self.s.settle_timeout_s:
            for kind, st in self.stack.stages.items():
                if not st.alive():
                    raise RuntimeError(f"{kind} exited during the run:\n{st.log_tail()}")
            if feeder.consumed() >= target and policy_versions(self.observer) and await self._reloads() >= 1:
                settled = True
                break
            await asyncio.sleep(1.0)
        await asyncio.sleep(3.0)  # one more lag update and scrape after the last record
        self.timings["drive_s"] = round(time.monotonic() - t0, 1)
        return {
            "run_id": self.run_id,
            "settled": settled,
            "samples_published": feeder.samples,
            "samples_with_outcome": feeder.consumed(),
            "learner_consumed": len(learner_consumed(self.stack.outcomes_path)),
            "policy_versions": policy_versions(self.observer),
            "engine_reloads": await self._reloads(),
            "dead_letters": len(self.observer.records.get("rollout.dlq", ()))
            + len(self.observer.records.get("dlq_other", ())),
            **self.timings,
        }


async def guardrail_run(out: Path, work_dir: Path, s: ShortRunSettings | None = None) -> dict[str, Any]:
    """The run of the module doc; writes the merged scrape to `out`; returns a summary."""
    run = ShortRun(work_dir, s)
    async with run:
        summary = await run.drive()
        targets = run.targets()
        write_scrape(out, await scrape(targets))
    summary["stop_s"] = run.timings["stop_s"]
    summary["scraped"] = sorted(targets)
    summary["out"] = str(out)
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ARTIFACTS / "guardrail_metrics.txt", help="the merged scrape")
    p.add_argument("--work-dir", type=Path, default=None, help="stack state and logs (default: a temp dir, removed)")
    p.add_argument("--batches", type=int, default=ShortRunSettings.batches)
    p.add_argument("--no-speculation", action="store_true")
    p.add_argument("--settle-timeout-s", type=float, default=ShortRunSettings.settle_timeout_s)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="primerl-guardrail-"))
    s = ShortRunSettings(
        batches=args.batches, speculation=not args.no_speculation, settle_timeout_s=args.settle_timeout_s
    )
    t0 = time.monotonic()
    try:
        summary = asyncio.run(guardrail_run(args.out, work_dir, s))
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    summary["wall_s"] = round(time.monotonic() - t0, 1)
    print(f"[guardrail run] {summary}")
    if not summary["settled"]:
        print("[guardrail run] did not settle in time: the SLO check will say what is missing", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
