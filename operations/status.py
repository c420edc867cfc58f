"""`primerl status`: consumer groups (members, partitions, lag), live workers from the Redis
registry, dead letters, prefix-cache hit rate and policy versions.

The registry contract (written by the workers): one Redis string per live worker,
`primerl:registry:<role>:<worker_id>`, a JSON object with at least worker_id, role,
host, pid, partitions, policy_version, heartbeat_at, and for engines prompt_tokens,
cached_prompt_tokens (cumulative) and load_tokens; the key's TTL is the heartbeat TTL,
so a dead worker's key vanishes by itself.

On the local Tansu broker some figures are approximate, and the report says so:
end offsets are wrong for multi-record batches (so lag and the DLQ count can be off),
and DescribeGroups returns members without their assignment or host (partitions then
come from the registry, where workers list their own).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.protocol.group import MemberAssignment
from redis.asyncio import Redis

from plumbing.config import Config
from plumbing.kafka import common_kwargs
from schemas import keys
from schemas.registry import WorkerInfo
from schemas.topics import COMPLETIONS, DLQ, PROMPTS, REWARDS, ROUTED, TOPICS


class Member(msgspec.Struct, kw_only=True):
    """One member of a consumer group as the broker describes it."""

    member_id: str
    client_id: str
    host: str
    partitions: list[str]  # "topic:partition"; empty when the broker does not say


class GroupStatus(msgspec.Struct, kw_only=True):
    """A consumer group: state, members, committed offsets and lag per topic."""

    group_id: str
    state: str
    members: list[Member]
    topics: list[str]
    lag: dict[str, int]  # topic -> records behind the end (end offset - committed)
    committed: dict[str, int]  # topic -> sum of committed offsets

    @property
    def total_lag(self) -> int:
        """Lag over every topic of the group."""
        return sum(self.lag.values())


class StatusReport(msgspec.Struct, kw_only=True):
    """Everything `primerl status` shows."""

    groups: list[GroupStatus]
    workers: list[WorkerInfo]
    bad_registry_entries: list[str]
    dead_letters: int
    cache_hit_rate: float | None  # None: no engine has served a prompt token yet
    policy_versions: dict[str, int]  # run id -> latest version
    notes: list[str]
    taken_at: float


# What each known group consumes (the workers' code: engine_workers/worker.py ENGINE_GROUP,
# router/router.py ROUTER_GROUP,
# verifier_workers/worker.py VERIFIER_GROUP, learners/worker.py `learner-<run_id>`, the archiver).
def group_topics(group_id: str, cfg: Config) -> list[str] | None:
    """The topics a known group consumes; None for a group this code does not run."""
    if group_id == "engine":
        return [ROUTED.name]
    if group_id == "router":
        return [PROMPTS.name]
    if group_id == "verifier":
        return [COMPLETIONS.name]
    if group_id.startswith("learner-"):
        return [COMPLETIONS.name, REWARDS.name]
    if group_id == "archiver":
        return list(cfg.archive.topics)
    return None


def _members(raw: list[Any]) -> list[Member]:
    out = []
    for member_id, client_id, host, _metadata, assignment in raw:
        parts: list[str] = []
        if assignment:
            try:
                decoded = MemberAssignment.decode(assignment)
                parts = [f"{t}:{p}" for t, ps in decoded.assignment for p in sorted(ps)]
            except Exception:  # noqa: BLE001 - a broker that sends something else: no partitions shown
                parts = []
        out.append(Member(member_id=member_id, client_id=client_id, host=host, partitions=parts))
    return out


async def consumer_groups(
    cfg: Config, include_all: bool = False, candidates: list[str] | None = None
) -> list[GroupStatus]:
    """Every group this system runs (all groups with `include_all`), described with lag.

    `candidates` are groups to look for even when the broker does not list them: Tansu
    lists only groups that have committed an offset, and a learner never commits (it
    keeps its offsets in its checkpoint). They are shown when they have members.
    """
    admin = AIOKafkaAdminClient(**common_kwargs(cfg))
    await admin.start()
    consumer = AIOKafkaConsumer(**common_kwargs(cfg), enable_auto_commit=False)
    await consumer.start()
    try:
        listed = sorted(g[0] for g in await admin.list_consumer_groups())
        wanted = [g for g in listed if include_all or group_topics(g, cfg) is not None]
        extra = [g for g in dict.fromkeys(candidates or []) if g not in listed]
        described: dict[str, tuple[str, list[Member]]] = {}
        for g in wanted + extra:
            for resp in await admin.describe_consumer_groups([g]):
                for _err, gid, state, _ptype, _proto, members in resp.groups:
                    described[gid] = (state, _members(members))
        wanted += [g for g in extra if described.get(g, ("", []))[1]]
        all_tps = [TopicPartition(t.name, p) for t in TOPICS.values() for p in range(t.partitions)]
        ends = await consumer.end_offsets(all_tps)
        out = []
        for g in wanted:
            topics = group_topics(g, cfg)
            tps = [tp for tp in all_tps if topics is None or tp.topic in topics]
            committed = await admin.list_consumer_group_offsets(g, partitions=tps)
            lag: dict[str, int] = {}
            sums: dict[str, int] = {}
            for tp in tps:
                om = committed.get(tp)
                offset = om.offset if om is not None else -1
                if topics is None and offset < 0:
                    continue  # an outside group: only the topics it committed on
                lag[tp.topic] = lag.get(tp.topic, 0) + max(0, ends.get(tp, 0) - max(offset, 0))
                sums[tp.topic] = sums.get(tp.topic, 0) + max(offset, 0)
            if g.startswith("learner-"):
                lag = {}  # a learner keeps its offsets in its checkpoint, not in the group: no lag to compute
            state, members = described.get(g, ("Unknown", []))
            out.append(
                GroupStatus(group_id=g, state=state, members=members, topics=sorted(sums), lag=lag, committed=sums)
            )
        return out
    finally:
        await consumer.stop()
        await admin.close()


async def dead_letter_count(cfg: Config) -> int:
    """Records on rollout.dlq (sum of its partitions' end offsets minus their starts)."""
    consumer = AIOKafkaConsumer(**common_kwargs(cfg), enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(DLQ.name, p) for p in range(DLQ.partitions)]
        ends = await consumer.end_offsets(tps)
        starts = await consumer.beginning_offsets(tps)
        return sum(ends[tp] - starts.get(tp, 0) for tp in tps)
    finally:
        await consumer.stop()


async def registry_workers(redis: Redis) -> tuple[list[WorkerInfo], list[str]]:
    """Live workers from the registry (SCAN), and the keys whose value is not a valid entry."""
    workers, bad = [], []
    async for key in redis.scan_iter(match=keys.registry_pattern(), count=500):
        raw = await redis.get(key)
        if raw is None:
            continue  # expired between SCAN and GET
        name = key.decode() if isinstance(key, bytes) else key
        try:
            workers.append(msgspec.json.decode(raw, type=WorkerInfo))
        except msgspec.DecodeError:
            bad.append(name)
    workers.sort(key=lambda w: (w.role, w.worker_id))
    return workers, bad


def cache_hit_rate(workers: list[WorkerInfo]) -> float | None:
    """sum(cached_prompt_tokens) / sum(prompt_tokens) over live engines; None before any prompt token."""
    engines = [w for w in workers if w.role == "engine"]
    total = sum(w.prompt_tokens for w in engines)
    return sum(w.cached_prompt_tokens for w in engines) / total if total else None


async def policy_versions(redis: Redis) -> dict[str, int]:
    """run id -> the latest policy version its learner published."""
    out = {}
    async for key in redis.scan_iter(match=keys.POLICY_VERSION_PATTERN, count=500):
        name = key.decode() if isinstance(key, bytes) else key
        value = await redis.get(key)
        if value is not None:
            out[keys.run_of_policy_version(name)] = int(value)
    return dict(sorted(out.items()))


async def collect_status(cfg: Config, redis: Redis, include_all: bool = False) -> StatusReport:
    """The whole status report."""
    versions = await policy_versions(redis)
    candidates = ["router", "engine", "verifier", "archiver", *(f"learner-{run}" for run in versions)]
    (groups, dlq), (workers, bad) = await asyncio.gather(
        asyncio.gather(consumer_groups(cfg, include_all, candidates), dead_letter_count(cfg)), registry_workers(redis)
    )
    notes = []
    if any(m.partitions == [] for g in groups for m in g.members):
        notes.append(
            "the broker did not report member assignments (Tansu does not): "
            "partitions below come from the worker registry"
        )
    notes.append(
        "lag and the dead-letter count come from end offsets, which the local Tansu broker reports approximately "
        "for multi-record batches; exact on Apache Kafka"
    )
    notes.append(
        "Tansu may go on describing members of consumers that have exited (it was seen keeping a finished learner's "
        "member as Stable): the registry's heartbeats say which workers are alive"
    )
    if any(g.group_id.startswith("learner-") for g in groups):
        notes.append("learner groups show no lag: a learner keeps its offsets in its checkpoint, not in the group")
    return StatusReport(
        groups=groups,
        workers=workers,
        bad_registry_entries=bad,
        dead_letters=dlq,
        cache_hit_rate=cache_hit_rate(workers),
        policy_versions=versions,
        notes=notes,
        taken_at=time.time(),
    )


def render(report: StatusReport) -> str:
    """A plain-text view of the report (rich tables when printed by the CLI)."""
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    buf = StringIO()
    console = Console(file=buf, width=140, force_terminal=False)
    groups = Table(title="consumer groups")
    for col in ("group", "state", "members", "partitions (broker)", "topics", "lag"):
        groups.add_column(col)
    for g in report.groups:
        parts = ", ".join(p for m in g.members for p in m.partitions) or "-"
        lag = "n/a" if g.group_id.startswith("learner-") else str(g.total_lag)
        groups.add_row(g.group_id, g.state, str(len(g.members)), parts[:60], ", ".join(g.topics) or "-", lag)
    console.print(groups)
    workers = Table(title="live workers (Redis registry)")
    for col in (
        "role",
        "worker",
        "host",
        "pid",
        "partitions",
        "policy",
        "heartbeat age",
        "prompt tok",
        "cached tok",
        "load tok",
    ):
        workers.add_column(col)
    now = time.time()
    for w in report.workers:
        workers.add_row(
            w.role,
            w.worker_id,
            w.host,
            str(w.pid),
            ",".join(map(str, w.partitions)) or "-",
            str(w.policy_version),
            f"{now - w.heartbeat_at:.1f}s",
            str(w.prompt_tokens),
            str(w.cached_prompt_tokens),
            f"{w.load_tokens:g}",
        )
    console.print(workers)
    rate = "n/a (no prompt tokens yet)" if report.cache_hit_rate is None else f"{report.cache_hit_rate:.3f}"
    console.print(f"dead letters: {report.dead_letters}    prefix-cache hit rate (live engines): {rate}")
    console.print("policy versions: " + (", ".join(f"{r}=v{v}" for r, v in report.policy_versions.items()) or "none"))
    for key in report.bad_registry_entries:
        console.print(f"[unreadable registry entry] {key}")
    for note in report.notes:
        console.print(f"note: {note}")
    return buf.getvalue()


def to_json(report: StatusReport) -> str:
    """The report as JSON (with each group's total lag)."""
    data = msgspec.to_builtins(report)
    for g, obj in zip(report.groups, data["groups"], strict=True):
        obj["total_lag"] = g.total_lag
    return json.dumps(data, indent=2)
