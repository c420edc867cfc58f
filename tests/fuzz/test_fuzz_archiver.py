"""Fuzz: the archiver (every record of its topics -> the run log), in-process.

The archiver does not dead-letter: every record must be archived exactly once, garbage
raw under `_undecodable`. Its five topics are swapped for private ones registered with
the real message types (the registry is what the archiver decodes by).
"""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from prometheus_client import CollectorRegistry

from archiver.archiver import Archiver
from plumbing.config import Config
from plumbing.kafka import Publisher
from plumbing.run_log import parse_file_name, read_messages
from schemas import TOPICS, Completion, DeadLetter, PolicyUpdate, PromptRequest, Reward, Topic
from tests.fuzz.harness import (
    DEFAULT_N,
    FUZZ_HEADER,
    Ledger,
    assert_clean,
    heavy_n,
    make_topic,
    publish_storm,
    stop_stage,
    wait_accounted,
)
from tests.kafka_helpers import wait_until

_TYPES = [
    ("prompts", PromptRequest),
    ("completions", Completion),
    ("rewards", Reward),
    ("policy", PolicyUpdate),
    ("dlq", DeadLetter),
]


def _archived(root: Path, seen: dict[Path, list[str]]) -> collections.Counter:
    """fuzz id -> rows archived, reading each new file once."""
    for path in root.glob("*/*/p*.parquet"):
        if path not in seen and parse_file_name(path.name):
            rows = pq.read_table(path, columns=["headers"]).column("headers").to_pylist()
            seen[path] = [next((h["value"].decode() for h in hs or () if h["name"] == FUZZ_HEADER), "") for hs in rows]
    return collections.Counter(f for ids in seen.values() for f in ids if f)


@pytest.mark.parametrize("variant", ["default", pytest.param("heavy", marks=pytest.mark.fuzz)])
async def test_archiver_survives_the_storm_and_archives_every_record_once(
    cfg: Config, tmp_path: Path, monkeypatch, variant: str, pytestconfig
) -> None:
    n = DEFAULT_N if variant == "default" else heavy_n(pytestconfig)
    run_id = f"fz-archiver-{uuid.uuid4().hex[:6]}"
    topics = {}
    for name, type_ in _TYPES:
        t = await make_topic(cfg, name, 2)
        monkeypatch.setitem(TOPICS, t, Topic(t, 2, type_, "fuzz"))
        topics[t] = type_
    cfg.archive.topics = list(topics)
    cfg.archive.flush_interval_s = 0.5
    root = tmp_path / "runs"
    t0 = time.monotonic()
    archiver = Archiver(cfg, CollectorRegistry(), group_id=f"archiver-fuzz-{uuid.uuid4().hex[:6]}", root=root)
    task = asyncio.create_task(archiver.run())
    storms = [
        await publish_storm(cfg, t, type_, n, seed=577 + i, run_id=run_id, tag=f"{run_id}-{i}")
        for i, (t, type_) in enumerate(topics.items())
    ]
    ledger = Ledger(storms)
    seen: dict[Path, list[str]] = {}

    def collect() -> bool:
        counts = _archived(root, seen)
        ledger.outputs.clear()
        ledger.outputs.update(counts)
        return True

    try:
        report = await wait_accounted(ledger, [task], extra=collect, what=f"archiver {variant} n={n}")
        collect()
        report = ledger.report()
        good = PromptRequest(run_id=run_id, text="after the storm")
        prompts_topic = next(t for t, ty in topics.items() if ty is PromptRequest)
        async with Publisher(cfg) as pub:
            await pub.publish(prompts_topic, good, key=b"good")
        await wait_until(
            lambda: (
                (root / run_id / prompts_topic).exists()
                and any(m.id == good.id for _, m in read_messages(root / run_id, prompts_topic))
            ),
            60,
            "the good record archived",
        )
        assert not task.done(), f"the archiver exited: {task.exception()!r}"
    finally:
        await stop_stage(archiver.stop, task, [])
    print(f"\n[fuzz] archiver {variant}: n={n} per topic x {len(topics)} topics, {time.monotonic() - t0:.1f}s")
    assert_clean(report, f"archiver {variant}")
