"""Fuzz: the deferral stage (rollout.deferred, group `deferral` -> rollout.prompts), in-process.

The stage is the real one (`engine_workers/deferral.py`, built as `primerl/serve.py`
builds it: a `PolicyFeed`, the stage's `DeadLetters`), on private topics (the module's
DEFERRED and PROMPTS, the feed's POLICY), its own consumer group (the module's
DEFERRAL_GROUP: the session engine's deferral is a member of `deferral`) and a Redis
database no other test uses (/7, the feed's letter ledger).

What "processed" means here: the stage never re-parks. A record that decodes is held
until the policy feed has its `min_policy_version` and is then re-published, once, to
rollout.prompts with `route` cleared (its output, matched by request id), or, when
`engine.park_timeout_s` runs out first (counted from `primerl.deferred_since` in its
metadata, else the record's time), dead-lettered as ParkTimeout. A record that does
not decode is dead-lettered. So each record gets exactly one of: one release, one
letter. The storm ends because every wait is bounded by the park timeout (20 s here,
measured from a time never later than now).

To reach every path, no policy exists when the storm starts (requests for v0 or less
go out at once), v8 is published after it (requests for v1..v8 still waiting go out
then, none before), and larger versions expire. Beside the generated storm, a few
valid requests carry hostile `primerl.deferred_since` values (the generator never
writes that key). Checked besides exactly-once: a release is the input with only
`route` cleared (and `created_at`, which a payload without one decodes to the time of
decoding, left out of the comparison), nothing is released before its version is published, every
ParkTimeout is for a version never published, and a good request parked after the
storm is released once its version is published, not before.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid

import msgspec
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

import engine_workers.deferral as deferral_module
import plumbing.policy_feed as feed_module
from engine_workers.deferral import DEFERRED_SINCE, Deferral
from plumbing.config import Config
from plumbing.dead_letters import DeadLetters
from plumbing.kafka import Publisher, common_kwargs
from plumbing.policy_feed import PolicyFeed
from schemas import CONTENT_TYPE_HEADER, MSGPACK, PolicyUpdate, PromptRequest, Route, SamplingParams, Topic, decode
from schemas import encode as encode_message
from tests.fuzz.harness import (
    DEFAULT_N,
    FUZZ_HEADER,
    Ledger,
    Sent,
    Storm,
    Watch,
    assert_clean,
    dlq_watch,
    heavy_n,
    make_topic,
    publish_storm,
    stop_stage,
    wait_accounted,
)
from tests.kafka_helpers import wait_until

PARK_TIMEOUT_S = 20.0
RELEASED_VERSION = 8  # published after the storm
NEVER = 2**63 - 1  # a version never published

# Hostile `primerl.deferred_since` values (a float in a string, as the engine writes it).
_SINCE = [
    "nan",
    "-nan",
    "inf",
    "-inf",
    "1e400",
    "-1e400",
    "0",
    "-1",
    "-1e308",
    "1e308",
    "abc",
    "",
    " 12.5 ",
    "1_000",
    "\x00",
    "0x10",
    "9" * 5000,
    "1" + "0" * 400,
    "\u0661\u0662",  # Arabic-Indic digits: float() takes them
    "now",
]


def _since_cases(run_id: str) -> list[PromptRequest]:
    now = time.time()
    values = [*_SINCE, f"{now + 1e6:.3f}", f"{now - 1e6:.3f}", f"{now:.3f}"]
    return [
        PromptRequest(
            id=f"{run_id}-since-{i}-{v}",
            run_id=run_id,
            text="parked",
            sampling=SamplingParams(max_tokens=2),
            metadata={DEFERRED_SINCE: since},
            min_policy_version=v,
            route=Route(worker_id="w-gone", policy="hash", prefill_tokens=9.0) if i % 2 else None,
        )
        for i, since in enumerate(values)
        for v in (0, 5, NEVER)
    ]


def _since_floor(req: PromptRequest, t_storm: float) -> float:
    """A lower bound of when the stage counts `req` parked (its `_since`): the metadata when
    finite, never after the record's time, which is after the storm began (`t_storm`)."""
    try:
        since = float(req.metadata.get(DEFERRED_SINCE, ""))
    except ValueError:
        return t_storm
    return min(since, t_storm) if math.isfinite(since) else t_storm


def _comparable(req: PromptRequest) -> bytes:
    """`req` encoded, its `created_at` zeroed: a payload without one decodes to the time of decoding."""
    return encode_message(msgspec.structs.replace(req, created_at=0.0))


def _diff(expected: bytes, got: list[bytes]) -> str:
    """The fields where a release differs from its input (route cleared)."""
    want = msgspec.msgpack.decode(expected) if expected else {}
    out = []
    for g in got:
        have = msgspec.msgpack.decode(g)
        out.append(
            {k: (str(want.get(k))[:80], str(have.get(k))[:80]) for k in {*want, *have} if want.get(k) != have.get(k)}
        )
    return f"{want.get('id')}: {out}"


async def _publish_parked(cfg: Config, topic: str, reqs: list[PromptRequest], tag: str) -> Storm:
    """Publish valid parked requests tagged like the storm's records."""
    producer = AIOKafkaProducer(**common_kwargs(cfg), acks="all", enable_idempotence=False)
    await producer.start()
    sent = []
    try:
        for i, req in enumerate(reqs):
            raw = encode_message(req)
            md = await producer.send_and_wait(
                topic,
                raw,
                key=req.routing_key(),
                headers=[(CONTENT_TYPE_HEADER, MSGPACK.encode()), (FUZZ_HEADER, f"{tag}-{i}".encode())],
            )
            sent.append(Sent(f"{tag}-{i}", "deferred_since", topic, md.partition, md.offset, len(raw), req.id))
    finally:
        await producer.stop()
    return Storm(topic, sent)


@pytest.mark.parametrize("variant", ["default", pytest.param("heavy", marks=pytest.mark.fuzz)])
async def test_deferral_survives_the_storm_and_accounts_for_every_record(
    cfg: Config, monkeypatch, variant: str, pytestconfig
) -> None:
    n = DEFAULT_N if variant == "default" else heavy_n(pytestconfig)
    run_id = f"fz-deferral-{uuid.uuid4().hex[:6]}"
    deferred, prompts = await make_topic(cfg, "deferred", 4), await make_topic(cfg, "prompts", 4)
    policy = await make_topic(cfg, "policy", 1)
    monkeypatch.setattr(deferral_module, "DEFERRED", Topic(deferred, 4, PromptRequest, "fuzz"))
    monkeypatch.setattr(deferral_module, "PROMPTS", Topic(prompts, 4, PromptRequest, "fuzz"))
    monkeypatch.setattr(deferral_module, "DEFERRAL_GROUP", f"deferral-fuzz-{uuid.uuid4().hex[:6]}")
    monkeypatch.setattr(feed_module, "POLICY", Topic(policy, 1, PolicyUpdate, "fuzz"))
    cfg.engine.park_timeout_s = PARK_TIMEOUT_S
    cfg.engine.policy_run = ""  # as the engine: the newest version of any run
    redis = Redis.from_url(cfg.redis_url.rsplit("/", 1)[0] + "/7")  # a database no other test uses
    await redis.flushdb()
    t0 = time.monotonic()
    async with Publisher(cfg) as pub:
        registry = CollectorRegistry()
        letters = DeadLetters.from_config(cfg, pub, "engine", registry)
        feed = PolicyFeed(cfg, letters.for_stage("policy-follower"), None, redis)
        feed_task = asyncio.create_task(feed.run())
        await asyncio.wait_for(feed.caught_up.wait(), 60)
        deferral = Deferral(cfg, pub, feed, letters.for_stage("deferral"), registry)
        task = asyncio.create_task(deferral.run())

        published = {"version": 0}  # the newest version the test has (begun to) publish
        inputs: dict[str, bytes] = {}  # request id -> what its release must be
        outputs: dict[str, list[bytes]] = {}
        early: list[str] = []  # released before their version was published

        def on_input(r) -> None:
            try:
                req = decode(r.value, PromptRequest, list(r.headers))
            except Exception:  # noqa: BLE001 - the stage dead-letters it; nothing to compare
                inputs[f"undecodable@{r.partition}:{r.offset}"] = b""
                return
            inputs[req.id] = _comparable(msgspec.structs.replace(req, route=None))

        t_storm = time.time()
        storms = [
            await publish_storm(cfg, deferred, PromptRequest, n, seed=5151, run_id=run_id, tag=f"{run_id}-d"),
            await _publish_parked(cfg, deferred, _since_cases(run_id), f"{run_id}-s"),
        ]
        ledger = Ledger(storms)

        def on_released(r) -> None:
            req = decode(r.value, PromptRequest, list(r.headers))
            if req.min_policy_version > published["version"]:
                early.append(f"{req.id} v{req.min_policy_version} (published: v{published['version']})")
            outputs.setdefault(req.id, []).append(_comparable(req))
            ledger.output_for_msg_id(req.id)

        watches = [
            await dlq_watch(cfg, ledger).start(),
            await Watch(cfg, prompts, on_released).start(),
            await Watch(cfg, deferred, on_input).start(),
        ]
        try:
            published["version"] = RELEASED_VERSION  # before the update: a release it causes is not early
            await pub.publish(policy, PolicyUpdate(run_id=run_id, version=RELEASED_VERSION, weights_path="/x"))
            t_v8 = time.time()
            report = await wait_accounted(
                ledger, [task, feed_task], stall_s=PARK_TIMEOUT_S + 30, what=f"deferral {variant} n={n}"
            )

            good = PromptRequest(
                run_id=run_id,
                text="After the storm: 2 + 2 =",
                sampling=SamplingParams(max_tokens=2),
                min_policy_version=RELEASED_VERSION + 1,
                metadata={DEFERRED_SINCE: f"{time.time():.3f}"},
            )
            await pub.publish(deferred, good, key=good.routing_key())
            await asyncio.sleep(3)
            assert good.id not in outputs, "the good request was released before its version was published"
            published["version"] = RELEASED_VERSION + 1
            await pub.publish(policy, PolicyUpdate(run_id=run_id, version=RELEASED_VERSION + 1, weights_path="/x"))
            await wait_until(lambda: good.id in outputs, 30, "the good parked request released after the storm")
            total = sum(len(s.sent) for s in storms) + 1
            await wait_until(lambda: len(inputs) >= total, 60, "the input watch to read every record")
            assert not task.done(), f"the deferral exited: {task.exception()!r}"
            assert not feed_task.done(), "the policy feed exited"
        finally:
            await stop_stage(deferral.stop, task, watches)
            feed.stop()
            await asyncio.wait_for(asyncio.gather(feed_task, return_exceptions=True), 20)
            await redis.flushdb()
            await redis.aclose()

    mangled = [i for i, outs in outputs.items() if any(o != inputs.get(i) for o in outs)]
    timeouts = [(f, letter) for f, ls in ledger.letters.items() for letter in ls if letter.error_type == "ParkTimeout"]
    wrong_timeouts = []
    for f, letter in timeouts:
        if letter.payload_ref:  # spilled: its version is not read here
            continue
        req = decode(letter.payload, PromptRequest, list(letter.headers))
        # It was parked no earlier than `floor`: expired before v8 came only if floor + timeout <= t_v8.
        if req.min_policy_version <= RELEASED_VERSION and _since_floor(req, t_storm) + PARK_TIMEOUT_S > t_v8 + 1:
            wrong_timeouts.append(f"{f} v{req.min_policy_version} since={req.metadata.get(DEFERRED_SINCE, '')[:20]!r}")
    since_storm = {s.decoded_id or "": s.fuzz_id for s in storms[1].sent}
    since_wrong = [
        i
        for i, f in since_storm.items()
        if (i.endswith("-0") and not ledger.outputs.get(f))
        or (i.endswith(f"-{NEVER}") and not any(d.error_type == "ParkTimeout" for d in ledger.letters.get(f, [])))
    ]
    print(
        f"\n[fuzz] deferral {variant}: n={n} (+{len(storms[1].sent)} hostile deferred_since), "
        f"{time.monotonic() - t0:.1f}s; released {len(outputs)}, ParkTimeout letters {len(timeouts)}"
    )
    for w in watches:
        assert not w.errors, w.errors[:5]
    assert not early, early[:5]
    assert not mangled, [_diff(inputs.get(i, b""), outputs[i]) for i in mangled[:5]]
    assert not wrong_timeouts, wrong_timeouts[:5]
    assert not since_wrong, since_wrong[:5]
    assert_clean(report, f"deferral {variant}")
