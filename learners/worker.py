"""The learner: completions, trajectories and rewards -> verified, assembled groups -> update -> rollout.policy.

One process per run (group `learner-<run_id>`). This module is the learner's Kafka
I/O, verification, training calls and publishing; group assembly and the staleness
rule are the GroupBuffer's (learners/group_buffer.py). Every completion passes
`verify_completion` (engine signature) and every reward `verify_reward` (signature,
key, replay) before the buffer joins a reward with the completion it binds (ids and
hashes; the others with that id are dead-lettered); samples older than `max_policy_lag` versions are dropped.
A multi-turn session (issue 23) is a candidate only once finished: the completion of its
Trajectory, engine-signed and layout-checked (plumbing/sessions.py); its turns on
rollout.completions are the env hub's and are skipped here (counted).
Complete groups (or groups timed out with >= 2 samples) are trained on once
`groups_per_step` are ready; the new weights are written as a safetensors folder and
announced on rollout.policy, and the version goes to Redis, where producers read it
for admission control. Each step's samples (ids, in training order) and every drop go
to the outcome log (learners/outcome_log.py), from which a replay reproduces the run.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import ConsumerRecord
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from redis.asyncio import Redis
from redis.exceptions import RedisError

from learners.group_buffer import Drop, GroupBuffer
from learners.outcome_log import OutcomeLog
from learners.samples import Sample, StepStats
from learners.state import REPLAY_WINDOW, LearnerState, load_checkpoint, save_checkpoint
from learners.trainer import Trainer
from plumbing.config import Config
from plumbing.custody import engine_keyring
from plumbing.dead_letters import DeadLetters
from plumbing.failures import retry_transient
from plumbing.kafka import Publisher, consumer_kwargs
from plumbing.sessions import check_layout
from plumbing.trust import Keyring, Rejected, verify_completion, verify_reward
from schemas import Completion, PolicyUpdate, Reward, Trajectory, decode, encode, keys
from schemas.topics import COMPLETIONS, POLICY, REWARDS, TRAJECTORIES

log = logging.getLogger(__name__)


class _StateReplayGuard:
    """The replay check backed by the checkpointed state (so a restart neither forgets
    nor double-counts what it saw)."""

    def __init__(self, state: LearnerState) -> None:
        self._state = state
        self._seen = set(state.seen_rewards)

    async def first_time(self, reward_id: str) -> bool:
        if reward_id in self._seen:
            return False
        self._seen.add(reward_id)
        self._state.seen_rewards.append(reward_id)
        if len(self._state.seen_rewards) > REPLAY_WINDOW:
            self._seen.discard(self._state.seen_rewards.pop(0))
        return True


class _LearnerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.rejected = Counter(
            "primerl_learner_rewards_rejected", "Rewards failing verification", ["reason"], registry=registry
        )
        self.completions_rejected = Counter(
            "primerl_learner_completions_rejected",
            "Completions refused (dead-lettered): engine signature, or not bound by their verified reward",
            ["reason"],
            registry=registry,
        )
        self.session_turns = Counter(
            "primerl_learner_session_turns_skipped",
            "Session turns on rollout.completions, not candidates (a session trains once finished, as a trajectory)",
            registry=registry,
        )
        self.stale = Counter(
            "primerl_learner_samples_stale", "Samples dropped for exceeding the max policy lag", registry=registry
        )
        self.dropped = Counter(
            "primerl_learner_samples_dropped",
            "Samples (or rewards) that left the buffer untrained, by reason",
            ["reason"],
            registry=registry,
        )
        self.masked = Counter(
            "primerl_learner_samples_masked", "INFRA_FAIL/TIMEOUT samples masked out", registry=registry
        )
        self.buffer = Gauge("primerl_learner_buffer_samples", "Samples in partial groups", registry=registry)
        self.ready = Gauge("primerl_learner_ready_groups", "Complete groups waiting for a step", registry=registry)
        self.version = Gauge("primerl_learner_policy_version", "Latest published policy version", registry=registry)
        self.reward_mean = Gauge("primerl_learner_reward_mean", "Mean reward of the last step", registry=registry)
        self.lag = Gauge(
            "primerl_learner_policy_lag_mean", "Mean policy lag of the last step's samples", registry=registry
        )
        self.step_seconds = Histogram("primerl_learner_step_seconds", "Update step time", registry=registry)


@dataclass
class LearnerWorker:
    """See the module doc. `history` holds every step's stats (for the main job's table)."""

    cfg: Config
    trainer: Trainer
    keyring: Keyring
    publisher: Publisher
    redis: Redis
    registry: CollectorRegistry
    checkpoint: Path
    policies_dir: Path
    history: list[StepStats] = field(default_factory=list)
    engine_keys: Keyring | None = None  # None: from the config (custody.require_engine_signatures)

    def __post_init__(self) -> None:
        if self.engine_keys is None and self.cfg.custody.require_engine_signatures:
            self.engine_keys = engine_keyring(self.cfg)
        self.metrics = _LearnerMetrics(self.registry)
        self.dead_letters = DeadLetters.from_config(self.cfg, self.publisher, "learner", self.registry)
        self.state = LearnerState(run_id=self.cfg.run_id)
        restored = load_checkpoint(self.checkpoint)
        if restored is not None:
            self.state, opt_state = restored
            if self.state.weights_path:
                from safetensors.torch import load_file

                for f in Path(self.state.weights_path).glob("*.safetensors"):
                    self.trainer.model.lm.load_state_dict(load_file(f), strict=False)
            self.trainer.optimizer.load_state_dict(opt_state)
            log.info(
                "resumed at step %d, policy v%d, %d partial groups",
                self.state.step,
                self.state.version,
                len(self.state.buffer.groups),
            )
        lc = self.cfg.learner
        self.buffer = GroupBuffer(
            max_policy_lag=lc.max_policy_lag,
            group_timeout_s=lc.group_timeout_s,
            state=self.state.buffer,
            counters=self.state.counters,
        )
        if restored is not None:
            self.buffer.restart_orphan_clocks(time.time())
        self.replay = _StateReplayGuard(self.state)
        # Which completion ids each step trained on, and which were dropped and why.
        self.outcomes = OutcomeLog(self.checkpoint.parent / "outcomes.jsonl")
        self._stopping = asyncio.Event()
        self.assigned = asyncio.Event()
        self.version_published = asyncio.Condition()

    def stop(self) -> None:
        """Checkpoint and return from `run`."""
        self._stopping.set()

    @property
    def ready(self) -> asyncio.Event:
        """Set once the learner's group gave it its partitions."""
        return self.assigned

    async def run(self) -> None:
        """Consume, assemble, train and publish until stopped."""
        consumer = AIOKafkaConsumer(**consumer_kwargs(self.cfg, f"learner-{self.cfg.run_id}"))
        consumer.subscribe(
            [COMPLETIONS.name, TRAJECTORIES.name, REWARDS.name], listener=_SeekToCheckpoint(self, consumer)
        )
        await consumer.start()
        try:
            if self.state.version > 0:
                # A crash between the checkpoint and the announcement would leave engines
                # behind forever: announce the checkpointed version again (engines ignore
                # versions they have). The same checksum: one version, one set of weights.
                await self._announce(
                    self.state.step - 1, self.state.version, self.state.weights_path, self.state.checksum
                )
            await self._set_version_key()
            version_key_at = time.monotonic()
            while not self._stopping.is_set():
                batches = await consumer.getmany(timeout_ms=200, max_records=256)
                for tp, records in batches.items():
                    for record in records:
                        if not await self._ingest(consumer, record):
                            break  # stopping while the DLQ was down: the record stays unread
                        self.state.offsets[f"{tp.topic}:{tp.partition}"] = record.offset + 1
                self._record(self.buffer.expire(time.time()))
                self.metrics.buffer.set(self.buffer.partial_samples)
                self.metrics.ready.set(self.buffer.ready_groups)
                if self.buffer.ready_groups >= self.cfg.learner.groups_per_step:
                    await self._train_step()
                if time.monotonic() - version_key_at > 5.0:  # a Redis restarted without its data forgets it
                    await self._set_version_key(quiet=True)
                    version_key_at = time.monotonic()
        finally:
            save_checkpoint(self.checkpoint, self.state, self.trainer.optimizer)
            await consumer.stop()

    async def _ingest(self, consumer: AIOKafkaConsumer, record: ConsumerRecord) -> bool:
        """Take one record into the buffer, or dead-letter it; False only if stopped before its letter was written.

        Anything a record can make go wrong here is the record's fault (the learner's
        ingest touches no server): it is dead-lettered, never raised (an escaping error
        once stopped the learner on one bad reward).
        """
        try:
            if record.topic in (COMPLETIONS.name, TRAJECTORIES.name):
                if record.topic == COMPLETIONS.name:
                    completion = decode(record.value or b"", Completion, list(record.headers or ()))
                else:
                    completion = decode(record.value or b"", Trajectory, list(record.headers or ())).completion
                if completion.run_id != self.cfg.run_id:
                    return True
                if record.topic == COMPLETIONS.name and completion.session is not None:
                    # A turn of a session: the env hub's input; the session comes whole as a trajectory.
                    self.metrics.session_turns.inc()
                    self.state.count("session_turns_skipped")
                    return True
                try:
                    # Before the buffer: a forged completion never becomes a candidate.
                    verify_completion(completion, self.engine_keys)
                    if record.topic == TRAJECTORIES.name:
                        check_layout(completion)  # after the signature: the layout is the engine's
                except Rejected as err:
                    self.metrics.completions_rejected.labels(err.reason).inc()
                    self.state.count(f"rejected_completion_{err.reason}")
                    return await self._dead_letter(consumer, record, err)
                return await self._take(
                    consumer, self.buffer.add_completion(completion, time.time(), self.state.version)
                )
            reward = decode(record.value or b"", Reward, list(record.headers or ()))
            if reward.run_id != self.cfg.run_id:
                return True
            await verify_reward(reward, self.keyring, self.replay)
            return await self._take(consumer, self.buffer.add_reward(reward, time.time(), self.state.version))
        except Rejected as err:
            self.metrics.rejected.labels(err.reason).inc()
            self.state.count(f"rejected_{err.reason}")
            return await self._dead_letter(consumer, record, err)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - DecodeError and whatever else one record causes
            return await self._dead_letter(consumer, record, err)

    async def _take(self, consumer: AIOKafkaConsumer, drops: list[Drop]) -> bool:
        """Record a join's drops; dead-letter the completions it refused (their records were read
        earlier, so the letter carries the completion re-encoded, at offset -1)."""
        self._record(drops)
        for d in drops:
            for c in d.rejected:
                rebuilt = ConsumerRecord(
                    topic=COMPLETIONS.name,
                    partition=-1,
                    offset=-1,
                    timestamp=int(time.time() * 1000),
                    timestamp_type=0,
                    key=c.group_id.encode(),
                    value=encode(c),
                    checksum=None,
                    serialized_key_size=-1,
                    serialized_value_size=-1,
                    headers=[],
                )
                if not await self._dead_letter(consumer, rebuilt, Rejected(d.reason, d.detail)):
                    return False
        return True

    async def _dead_letter(self, consumer: AIOKafkaConsumer, record: ConsumerRecord, err: BaseException) -> bool:
        """Write the letter, retrying while the DLQ is down; meanwhile poll paused partitions to keep the membership."""
        delivery = asyncio.create_task(self.dead_letters.deliver(record, err, self._stopping))
        paused = False
        try:
            while True:
                done, _ = await asyncio.wait({delivery}, timeout=1.0)
                if done:
                    return delivery.result() is not None
                if not paused:
                    consumer.pause(*consumer.assignment())
                    paused = True
                await consumer.getmany(timeout_ms=0)  # paused: returns nothing, keeps max_poll_interval at bay
        finally:
            if paused:
                consumer.resume(*consumer.paused())

    def _record(self, drops: list[Drop]) -> None:
        """The buffer's drops into the outcome log and the metrics (its counters it keeps itself)."""
        for d in drops:
            self.outcomes.dropped(d.reason, self.state.step, d.ids)
            if d.reason == "binding_mismatch":
                self.metrics.completions_rejected.labels(d.reason).inc()
                log.warning("completion %s refused: %s", d.ids[0], d.detail)
                continue
            if d.reason == "duplicate_completion":
                self.metrics.dropped.labels(d.reason).inc(len(d.ids))
                continue
            self.metrics.dropped.labels(d.reason).inc(len(d.ids))
            if d.reason == "stale":
                self.metrics.stale.inc(len(d.ids))

    def _train(self, step: int, groups: list[list[Sample]]) -> tuple[StepStats | None, int]:
        """The update (in a worker thread) and the torch thread count it ran with."""
        return self.trainer.step(step, self.state.version + 1, groups, self.state.version), torch.get_num_threads()

    async def _train_step(self) -> None:
        """One step, with or without a learning signal: take, train, record, checkpoint, announce."""
        taken = self.buffer.take(self.cfg.learner.groups_per_step, self.state.version)
        self._record(taken.drops)
        groups = taken.groups
        self.metrics.masked.inc(sum(not s.trainable for g in groups for s in g))
        step, version = self.state.step, self.state.version
        # torch blocks for seconds: off the event loop, so Kafka heartbeats go on.
        stats, threads = await asyncio.to_thread(self._train, step, groups)
        updated = stats is not None
        # Before the checkpoint: a kill in between redoes the step, whose new line supersedes this one.
        self.outcomes.trained_groups(step, version + updated, groups, updated, threads)
        self.state.step += 1
        checksum, previous = "", self.state.weights_path
        if stats is None:
            # Every group had equal rewards (or only masked samples): nothing to learn, the
            # policy stays; the step still counts (its samples are consumed), so admission moves on.
            self.state.count("steps_without_signal")
            log.info("step %d: no group with a learning signal; weights unchanged", step)
            trainable = [s for g in groups for s in g if s.trainable]
            stats = StepStats(
                step=step,
                policy_version=version,
                samples=0,
                groups=len(groups),
                reward_mean=sum(s.reward for s in trainable) / max(1, len(trainable)),
                reward_std=statistics.pstdev([s.reward for s in trainable]) if len(trainable) > 1 else 0.0,
                loss=0.0,
                policy_lag_mean=sum(version - s.policy_version for s in trainable) / max(1, len(trainable)),
                clip_frac=0.0,
                masked_frac=0.0,
                wall_s=0.0,
            )
        else:
            version += 1
            dest = self.policies_dir / f"v{version}"
            checksum = await asyncio.to_thread(self.trainer.model.save_policy, dest)
            self.state.version, self.state.weights_path, self.state.checksum = version, str(dest), checksum
        save_checkpoint(self.checkpoint, self.state, self.trainer.optimizer)
        if updated:
            await self._announce(step, version, self.state.weights_path, checksum)
            await self._set_version_key()
            # Engines may still be loading the previous folder: remove the one before it.
            if previous:
                shutil.rmtree(Path(previous).with_name(f"v{version - 2}"), ignore_errors=True)
            self.metrics.version.set(version)
            self.metrics.reward_mean.set(stats.reward_mean)
            self.metrics.lag.set(stats.policy_lag_mean)
            self.metrics.step_seconds.observe(stats.wall_s)
            log.info(
                "step %d -> policy v%d: %d samples, reward %.3f, loss %.4f, lag %.2f, %.1fs; "
                "buffer %d samples in partial groups, %d groups ready",
                step,
                version,
                stats.samples,
                stats.reward_mean,
                stats.loss,
                stats.policy_lag_mean,
                stats.wall_s,
                self.buffer.partial_samples,
                self.buffer.ready_groups,
            )
        self.history.append(stats)
        async with self.version_published:
            self.version_published.notify_all()

    async def _announce(self, step: int, version: int, weights_path: str, checksum: str) -> None:
        """Publish the new version on rollout.policy, riding out a broker outage."""
        update = PolicyUpdate(
            run_id=self.cfg.run_id, version=version, weights_path=weights_path, step=max(0, step), checksum=checksum
        )
        await retry_transient(lambda: self.publisher.publish(POLICY.name, update), f"announcing policy v{version}")

    async def _set_version_key(self, quiet: bool = False) -> None:
        """The version in Redis for producers' admission; an outage is logged, not fatal (nothing depends on it for
        correctness)."""
        try:
            await self.redis.set(keys.policy_version(self.cfg.run_id), self.state.version)
        except (RedisError, OSError) as err:
            if not quiet:
                log.warning(
                    "could not record policy v%d in Redis (%s); retried every 5 s",
                    self.state.version,
                    type(err).__name__,
                )


class _SeekToCheckpoint(ConsumerRebalanceListener):
    """On assignment, continue from the checkpoint's offsets (not the group's commits)."""

    def __init__(self, learner: LearnerWorker, consumer: AIOKafkaConsumer) -> None:
        self._learner = learner
        self._consumer = consumer

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        return None

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        for tp in assigned:
            offset = self._learner.state.offsets.get(f"{tp.topic}:{tp.partition}")
            if offset is not None:
                self._consumer.seek(tp, offset)
        self._learner.assigned.set()
        log.info(
            "learner assigned [%d partitions] at step %d, policy v%d",
            len(assigned),
            self._learner.state.step,
            self._learner.state.version,
        )
