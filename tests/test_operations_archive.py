"""The archiver on the real broker: run logs per run and topic, idempotent restarts, garbage kept raw."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pyarrow.parquet as pq
from prometheus_client import CollectorRegistry, generate_latest

from archiver.archiver import Archiver
from plumbing.config import Config
from plumbing.kafka import Publisher
from plumbing.run_log import UNDECODABLE, read_messages, read_topic, run_files
from producers.arithmetic import arithmetic_requests
from schemas import CONTENT_TYPE_HEADER, JSON, PolicyUpdate, PromptRequest
from schemas.topics import POLICY, PROMPTS
from tests.kafka_helpers import wait_until


def _manifest(root: Path, run_id: str) -> dict:
    path = root / run_id / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {}


async def _archive_until(cfg: Config, root: Path, group: str, done, what: str, timeout_s: float = 60) -> Archiver:
    """Run an archiver until `done(archiver)` holds after a flush; stop it (flush + commit) and return it."""
    registry = CollectorRegistry()
    archiver = Archiver(cfg, registry, group_id=group, root=root)
    task = asyncio.create_task(archiver.run())
    try:
        await wait_until(lambda: archiver.flushes > 0 and done(archiver), timeout_s, what)
    finally:
        archiver.stop()
        await task
    archiver.metrics_text = generate_latest(registry).decode()  # type: ignore[attr-defined]
    return archiver


async def test_archives_a_run_per_topic_and_restarts_write_nothing_twice(cfg: Config, tmp_path: Path) -> None:
    cfg.archive.flush_interval_s = 0.5
    root = tmp_path / "runs"
    run_id = f"arch-{uuid.uuid4().hex[:8]}"
    # More tokens than the context: a live engine of the session dead-letters them at once
    # instead of serving them (this test is about the archive, not the completions).
    reqs = arithmetic_requests(run_id, 12, 2, max_tokens=100_000)
    async with Publisher(cfg) as pub:
        await pub.publish_many(PROMPTS.name, [(r, r.routing_key()) for r in reqs[:8]])
        await pub.publish(POLICY.name, PolicyUpdate(run_id=run_id, version=3, weights_path="/nowhere", checksum="abc"))
    group = f"archiver-test-{uuid.uuid4().hex[:6]}"
    first = await _archive_until(
        cfg,
        root,
        group,
        lambda _: _manifest(root, run_id).get("messages_per_topic", {}).get(PROMPTS.name) == 8,
        "8 prompts archived",
    )
    assert "primerl_archiver_records_total" in first.metrics_text  # type: ignore[attr-defined]
    files_before = {p: p.stat().st_mtime_ns for p in (root / run_id).rglob("*.parquet")}
    # More records, then the same group again: only the new ones are written.
    async with Publisher(cfg) as pub:
        await pub.publish_many(PROMPTS.name, [(r, r.routing_key()) for r in reqs[8:]])
    await _archive_until(
        cfg,
        root,
        group,
        lambda _: _manifest(root, run_id).get("messages_per_topic", {}).get(PROMPTS.name) == 12,
        "12 prompts archived",
    )
    # A group with no commits at all (as if every commit had been lost) re-reads everything: all skipped.
    # 13 of this run's records (12 prompts, 1 policy update) at least are read again and skipped.
    await _archive_until(cfg, root, f"{group}-lost-commits", lambda a: a.metrics.skipped._value.get() >= 13, "13 skips")
    for path, mtime in files_before.items():
        assert path.stat().st_mtime_ns == mtime, f"{path} rewritten"
    table = read_topic(root / run_id, PROMPTS.name)
    assert table.num_rows == 12 and len(set(table.column("id").to_pylist())) == 12
    decoded = [m for _, m in read_messages(root / run_id, PROMPTS.name)]
    assert sorted(m.id for m in decoded) == sorted(r.id for r in reqs)
    assert all(isinstance(m, PromptRequest) for m in decoded)
    manifest = _manifest(root, run_id)
    assert manifest["messages_per_topic"] == {PROMPTS.name: 12, POLICY.name: 1}
    assert manifest["policy_versions"] == [3] and manifest["tasks"] == ["math_format"]
    assert manifest["config"]["archive"]["root"] and manifest["model"]
    # Positions are kept: (partition, offset) unique, the key is the routing key.
    rows = table.select(["partition", "offset", "key", "group_id"]).to_pylist()
    assert len({(r["partition"], r["offset"]) for r in rows}) == 12
    assert all(r["key"] == r["group_id"].encode() for r in rows)


async def test_garbage_is_archived_raw_with_the_error_and_the_archiver_goes_on(cfg: Config, tmp_path: Path) -> None:
    cfg.archive.flush_interval_s = 0.5
    root = tmp_path / "runs"
    run_id = f"garb-{uuid.uuid4().hex[:8]}"
    marker = run_id.encode()
    good = arithmetic_requests(run_id, 1, 1)[0]
    garbage = [
        b"\xde\xad\xbe\xef " + marker,
        b'{"run_id": "' + marker + b'", "text": 3}',  # JSON of the wrong shape
        b'{"run_id": "' + marker + b'", "text": "hi", "schema_version": 99}',  # from the future
        b"",
    ]
    async with Publisher(cfg) as pub:
        for g in garbage:
            await pub.publish_raw(
                PROMPTS.name, g, key=marker, headers=[(CONTENT_TYPE_HEADER, JSON.encode())] if g[:1] == b"{" else None
            )
        await pub.publish_raw(PROMPTS.name, b"\x00", key=marker, headers=[(CONTENT_TYPE_HEADER, b"text/plain")])
        await pub.publish(PROMPTS.name, good, key=good.routing_key())

    def garbage_archived() -> bool:
        files = run_files(root / UNDECODABLE, PROMPTS.name)
        if not files or not (root / run_id).exists():
            return False
        keys = [k for f in files for k in pq.read_table(f, columns=["key"]).column("key").to_pylist()]
        return keys.count(marker) == len(garbage) + 1

    await _archive_until(
        cfg, root, f"archiver-garbage-{uuid.uuid4().hex[:6]}", lambda _: garbage_archived(), "garbage + the good record"
    )
    rows = [r for r in read_topic(root / UNDECODABLE, PROMPTS.name).to_pylist() if r["key"] == marker]
    assert sorted(r["value"] for r in rows) == sorted([*garbage, b"\x00"])
    assert all(r["error"] and r["run_id"] is None for r in rows)
    errors = " | ".join(r["error"] for r in rows)
    assert "schema_version" in errors and "unsupported content type" in errors
    # The good record after the garbage was archived under its run.
    assert [m.id for _, m in read_messages(root / run_id, PROMPTS.name)] == [good.id]
    assert _manifest(root, UNDECODABLE)["undecodable"] >= len(garbage) + 1


async def test_a_run_log_that_cannot_be_written_pauses_the_archiver_until_it_can(cfg: Config, tmp_path: Path) -> None:
    cfg.archive.flush_interval_s = 0.3
    root = tmp_path / "runs"
    root.write_text("a file where the run-log folder should be")  # every write fails (NotADirectoryError)
    run_id = f"full-{uuid.uuid4().hex[:8]}"
    reqs = arithmetic_requests(run_id, 3, 1)
    async with Publisher(cfg) as pub:
        await pub.publish_many(PROMPTS.name, [(r, r.routing_key()) for r in reqs])
    registry = CollectorRegistry()
    archiver = Archiver(cfg, registry, group_id=f"archiver-full-{uuid.uuid4().hex[:6]}", root=root)
    task = asyncio.create_task(archiver.run())
    try:
        await wait_until(
            lambda: (registry.get_sample_value("primerl_archiver_write_failures_total") or 0) >= 2,
            what="failed flushes, retried",
        )
        assert not task.done(), "the archiver died on a failed write"
        assert archiver.flushes == 0  # nothing committed that is not on disk
        root.unlink()  # the disk is back

        def archived() -> list[str]:
            return [m.id for _, m in read_messages(root / run_id, PROMPTS.name)] if (root / run_id).exists() else []

        await wait_until(lambda: len(archived()) >= len(reqs), timeout_s=90, what="the records, once writable")
    finally:
        archiver.stop()
        await task
    assert sorted(archived()) == sorted(r.id for r in reqs)  # each once


def test_ints_a_column_cannot_hold_are_left_null_and_the_write_succeeds(tmp_path: Path) -> None:
    # Found by the fuzz suite: a completion with sample_index 2**32 (a valid msgpack int)
    # made pyarrow refuse the whole flush ("too large to fit in C integer type") and the
    # archiver exited, and again on every restart.
    import msgspec
    from aiokafka.structs import ConsumerRecord

    from plumbing.run_log import record_row, write_atomically
    from schemas import encode
    from schemas.topics import COMPLETIONS
    from tests.reward_helpers import make_completion

    c = msgspec.structs.replace(make_completion("x"), sample_index=2**32, policy_version=2**64 - 1)
    value = encode(c)
    rec = ConsumerRecord(COMPLETIONS.name, 0, 7, 0, 0, b"k", value, None, 1, len(value), [])
    run, row = record_row(rec)
    assert run == c.run_id and row["sample_index"] is None and row["policy_version"] is None and row["value"] == value
    write_atomically(tmp_path / "p0-7-7.parquet", [row])
    assert pq.read_table(tmp_path / "p0-7-7.parquet").num_rows == 1


def test_a_non_finite_creation_time_does_not_poison_the_manifest(tmp_path: Path) -> None:
    # Found by the fuzz suite: a message with created_at NaN/inf (valid msgpack floats) put
    # NaN into manifest.json (json.dump writes it), which load_manifest cannot read: the
    # archiver exited at the next flush of that run, and on every restart.
    from plumbing.run_log import Manifest, file_stats, load_manifest, save_manifest

    rows = [{"error": None, "created_at": x} for x in (float("nan"), float("inf"), 5.0, float("-inf"))]
    m = Manifest(run_id="r")
    m.add("t/p0-0-3.parquet", "t", file_stats(rows))
    save_manifest(tmp_path, m)
    again = load_manifest(tmp_path, "r")
    assert again.first_created_at == again.last_created_at == 5.0
