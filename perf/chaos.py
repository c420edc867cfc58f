"""Chaos run: a training run through every stage while stages are SIGKILLed, Redis is
restarted without its data and the broker is paused past the session timeout.

    python -m perf.chaos --samples 1000 --faults 12 --seed 0     # `make chaos`
    python -m perf.chaos --samples 160 --faults 7                 # one fault of each kind

Each stage is its own process (perf/stack.py): router (alone), engine (`--no-router`),
verifier, learner for one run id, archiver. Faults fire on a seeded schedule, spread
over the run by the learner's progress: the first seven are one of each kind in a seeded
order (SIGKILL of the router, engine, verifier, learner, archiver process group; Redis
SIGKILLed and started empty on its port; the broker SIGSTOPped for `--pause-s`, longer
than the session timeout, then SIGCONTed), further ones are random. A killed stage is
restarted after a second or two; a stage that exits on its own is a crash: recorded
with its log's end, and restarted.

At the end (the learner has consumed what it can, every stage stopped gracefully) the
report is built from the topics (read back in full, no group), the learner's outcome
log and checkpoint, and the archive: every published sample's final outcome (trained,
dropped as stale / timed-out group, dead-lettered with the stage and error, or still
buffered in the learner's checkpoint); lost = none of these. Duplicate records are
redelivered copies (the same id; identical content or, for regenerated completions,
not); duplicate effects are completions rewarded with more than one distinct reward by
one verifier version, samples trained in more than one step, versions published with
two checksums. Written to artifacts/chaos_report.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import shutil
import statistics
import sys
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from learners.outcome_log import committed_steps, read_outcomes
from perf.common import ARTIFACTS
from perf.stack import KINDS, Feeder, Observer, Stack, StackSettings, learner_consumed, read_checkpoint_state
from schemas import Completion, PolicyUpdate, PromptRequest, Reward
from schemas.completions import completion_id
from schemas.topics import COMPLETIONS, DLQ, POLICY, PROMPTS, REWARDS, ROUTED

log = logging.getLogger("perf.chaos")

# Error types of a server being away (not of bad input).
INFRA_ERRORS = {
    "ConnectionError",
    "TimeoutError",
    "RedisError",
    "OSError",
    "KafkaTimeoutError",
    "KafkaConnectionError",
    "RequestTimedOutError",
    "NodeNotReadyError",
    "NotLeaderForPartitionError",
    "BusyLoadingError",
    "ConnectionRefusedError",
    "BrokenPipeError",
    "ConnectionResetError",
    "CancelledError",
    "FatalError",
}
FAULT_KINDS = tuple(f"kill:{k}" for k in KINDS) + ("redis_restart", "broker_pause")
# Where a stage's work shows up: its output topic (learner: its outcome log; archiver: files).
OUTPUT_TOPIC = {"router": ROUTED.name, "engine": COMPLETIONS.name, "verifier": REWARDS.name}


@dataclass
class Fault:
    """One injected fault and how long the system took to recover from it."""

    kind: str
    at: float  # wall time it was injected
    at_s: float = 0.0  # seconds since the run began
    processes_killed: int = 0
    restarted_at: float = 0.0
    ready_at: float = 0.0
    ended_at: float = 0.0  # broker: SIGCONT; redis: the empty server answers
    recovery: dict[str, float | None] = field(default_factory=dict)
    dead_letters_after: int = 0  # dead letters created between this fault and the next
    crashes_after: list[str] = field(default_factory=list)
    target_busy: bool = False  # the target had work in flight when the fault hit


def schedule(seed: int, n: int) -> list[str]:
    """Every kind once (seeded order), then random kinds up to `n` (at least one of each)."""
    rng = random.Random(seed)
    kinds = list(FAULT_KINDS)
    rng.shuffle(kinds)
    while len(kinds) < n:
        kinds.append(rng.choice(FAULT_KINDS))
    return kinds


class ChaosRun:
    """Drives one chaos run; `report()` after `run()`."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        run_id = args.run_id or f"chaos-{uuid.uuid4().hex[:6]}"
        self.work_dir = Path(args.work_dir or (ARTIFACTS / "chaos" / run_id)).resolve()
        self.settings = StackSettings(
            run_id=run_id,
            work_dir=self.work_dir,
            group_size=args.group_size,
            prompts_per_batch=args.prompts_per_batch,
            groups_per_step=args.groups_per_step,
            max_tokens=args.max_tokens,
            min_tokens=args.min_tokens,
            max_policy_lag=args.max_policy_lag,
            group_timeout_s=args.group_timeout_s,
            seed=args.seed,
        )
        self.stack = Stack(self.settings)
        self.plan = schedule(args.seed, max(args.faults, len(FAULT_KINDS))) if args.faults > 0 else []
        self.rng = random.Random(args.seed + 1)
        self.faults: list[Fault] = []
        self.crashes: list[dict[str, Any]] = []
        self.t0 = time.time()
        self._pending_restart: dict[str, tuple[float, Fault | None]] = {}  # kind -> (when, fault)
        self._busy = False  # a broker pause or Redis restart in progress
        self._watch_index: Fault | None = None

    def say(self, msg: str) -> None:
        print(f"[chaos {time.time() - self.t0:6.0f}s] {msg}", flush=True)

    # --- the run ----------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        a = self.args
        self.say(f"run {self.settings.run_id}: {a.samples} samples, faults {self.plan}; work dir {self.work_dir}")
        cfg = await self.stack.start_servers()
        self.observer = Observer(cfg, self.settings.run_id)
        try:
            await self.stack.start_stages()
            self.say(
                "all stages ready: "
                + ", ".join(f"{k} pid {s.proc.pid}" for k, s in self.stack.stages.items() if s.proc)
            )
            await self.observer.start()
            self.feeder = Feeder(cfg, self.settings, self.stack.outcomes_path, self.observer)
            self.t0 = time.time()
            stop_feed = asyncio.Event()
            feed = asyncio.create_task(self.feeder.run(a.samples, stop_feed))
            try:
                await self._supervise(feed)
            finally:
                stop_feed.set()
                feed.cancel()
                await asyncio.gather(feed, return_exceptions=True)
            self.wall_s = time.time() - self.t0
            self.say("stopping the stages (SIGTERM: in-flight work commits, the learner checkpoints)")
            self.exit_codes = await asyncio.to_thread(self.stack.stop_all)
            await self.observer.wait_idle()
            return self.report()
        finally:
            await self.observer.stop()
            await asyncio.to_thread(self.stack.stop_all)  # no-op when stopped already
            await asyncio.to_thread(self.stack.stop_servers)
            if not self.args.keep:  # two 0.5 GB safetensors folders; logs, archive and outcome log stay
                shutil.rmtree(self.stack.state_dir / "policies", ignore_errors=True)
                self.stack.checkpoint_path.unlink(
                    missing_ok=True
                )  # 1.1 GB with AdamW state; read into the report already

    async def _supervise(self, feed: asyncio.Task[None]) -> None:
        a = self.args
        # Spread over the learner's progress (samples with an outcome), up to 80 % of the target.
        thresholds = [0.8 * a.samples * i / len(self.plan) for i in range(len(self.plan))]
        last_print = last_fault = 0.0
        last_consumed, consumed_since = -1, time.time()
        drain_started = armed_at = 0.0
        while True:
            now = time.time()
            self._tend_stages(now)
            await self._watch_redis_index()
            consumed = self.feeder.consumed()
            if consumed != last_consumed:
                last_consumed, consumed_since = consumed, now
            nxt = len(self.faults)
            stable = (
                not self._busy and not self._pending_restart and all(s.ready_at for s in self.stack.stages.values())
            )
            due = consumed >= thresholds[nxt] if nxt < len(self.plan) else False
            if feed.done() and now - consumed_since > a.drain_idle_s / 2:
                due = True  # the learner is stuck short of the mark: fire the rest anyway
            if nxt < len(self.plan) and stable and due and consumed > 0 and now - last_fault >= a.min_gap_s:
                # Armed: fire when the target has work in flight (a kill of an idle stage proves
                # little), or after `busy_wait_s` anyway; at once when every sample has its
                # outcome, since no work will come (the short chaos test spent 137 of its 424 s
                # waiting so).
                armed_at = armed_at or now
                target_busy = self._busy_for(self.plan[nxt])
                all_done = feed.done() and consumed >= self.feeder.samples
                if target_busy or all_done or now - armed_at > a.busy_wait_s:
                    await self._inject(self.plan[nxt], busy=target_busy)
                    last_fault, armed_at = time.time(), 0.0
            if now - last_print >= a.progress_s:
                last_print = now
                self._progress(consumed)
            if feed.done() and feed.exception():
                raise feed.exception()  # type: ignore[misc]
            if feed.done() and len(self.faults) == len(self.plan) and stable:
                drain_started = drain_started or now
                if consumed >= self.feeder.samples:
                    self.say("every published sample has an outcome")
                    return
                if now - max(consumed_since, drain_started) > a.drain_idle_s:
                    self.say(f"no learner progress for {a.drain_idle_s:.0f}s: ending the drain")
                    return
                if now - drain_started > a.drain_timeout_s:
                    self.say("drain timeout")
                    return
            if now - self.t0 > a.max_wall_s:
                self.say(f"max wall time {a.max_wall_s:.0f}s reached")
                return
            await asyncio.sleep(0.5)

    def _tend_stages(self, now: float) -> None:
        for kind, st in self.stack.stages.items():
            if not st.alive() and kind not in self._pending_restart:
                code = st.proc.returncode if st.proc else None
                crash = {
                    "stage": kind,
                    "at_s": round(now - self.t0, 1),
                    "exit_code": code,
                    "log_tail": st.log_tail(15),
                    "log_file": str(st.log_file),
                }
                self.crashes.append(crash)
                if self.faults:
                    self.faults[-1].crashes_after.append(kind)
                self.say(f"CRASH: {kind} exited with {code} on its own; restarting it (log {st.log_file})")
                self._pending_restart[kind] = (now, None)
            when = self._pending_restart.get(kind)
            if when is not None and now >= when[0]:
                st.start()
                if when[1] is not None:
                    when[1].restarted_at = now
                del self._pending_restart[kind]
            if st.alive() and not st.ready_at and st.check_ready():
                for f in reversed(self.faults):
                    if f.kind == f"kill:{kind}" and not f.ready_at:
                        f.ready_at = st.ready_at
                        self.say(f"{kind} ready again {f.ready_at - f.at:.1f}s after the kill")
                        break

    def _busy_for(self, kind: str) -> bool:
        """Whether the fault's target has work in flight now (from what the observer read)."""
        obs = self.observer
        routed = {r.msg.id for r in obs.records.get(ROUTED.name, ()) if isinstance(r.msg, PromptRequest)}
        published = {r.id for r in self.feeder.requests}
        requests_done = {i.rsplit("/", 1)[0] for i in obs.completion_ids}
        engine_busy = bool(routed - requests_done)
        verifier_busy = bool(obs.completion_ids - obs.reward_completion_ids)
        busy = {
            "kill:router": bool(published - routed),
            "kill:engine": engine_busy,
            "kill:verifier": verifier_busy,
            "kill:learner": bool(obs.reward_completion_ids - learner_consumed(self.stack.outcomes_path)),
            "kill:archiver": True,
            "redis_restart": engine_busy or verifier_busy,  # ledger claims are held
            "broker_pause": engine_busy or verifier_busy,
        }
        return busy[kind]

    async def _inject(self, kind: str, busy: bool = False) -> None:
        f = Fault(kind=kind, at=time.time(), at_s=round(time.time() - self.t0, 1), target_busy=busy)
        self.faults.append(f)
        if kind.startswith("kill:"):
            stage = kind.split(":", 1)[1]
            st = self.stack.stages[stage]
            f.processes_killed = await asyncio.to_thread(st.kill)
            delay = self.rng.uniform(0.5, 2.0)
            self._pending_restart[stage] = (time.time() + delay, f)
            self.say(
                f"FAULT {len(self.faults)}/{len(self.plan)}: SIGKILL {stage} ({f.processes_killed} processes); "
                f"restart in {delay:.1f}s"
            )
        elif kind == "redis_restart":
            self._busy = True
            self.say(f"FAULT {len(self.faults)}/{len(self.plan)}: redis-server SIGKILLed, restarting empty on its port")
            took = await asyncio.to_thread(self.stack.restart_redis)
            f.ended_at = time.time()
            self._watch_index = f
            self._busy = False
            self.say(f"redis back (empty) after {took:.1f}s")
        elif kind == "broker_pause":
            self._busy = True
            assert self.stack.cfg is not None  # set by start_servers, before any fault
            self.say(
                f"FAULT {len(self.faults)}/{len(self.plan)}: broker SIGSTOP for {self.args.pause_s:.0f}s "
                f"(session timeout {self.stack.cfg.kafka.session_timeout_ms / 1000:.0f}s)"
            )
            self.stack.pause_broker()

            async def resume() -> None:
                try:
                    await asyncio.sleep(self.args.pause_s)
                finally:
                    self.stack.resume_broker()
                    f.ended_at = time.time()
                    self._busy = False
                    self.say("broker SIGCONT")

            asyncio.create_task(resume())

    async def _watch_redis_index(self) -> None:
        """After a Redis restart: when the engine has re-registered in the empty Redis."""
        f = self._watch_index
        if f is None:
            return
        from plumbing.redis_client import connect_redis

        assert self.stack.cfg is not None  # set by start_servers
        client = connect_redis(self.stack.cfg, socket_timeout=1, socket_connect_timeout=1)
        try:
            keys = [k async for k in client.scan_iter("primerl:registry:*")]
        except Exception:  # noqa: BLE001 - not up yet
            keys = []
        finally:
            await client.aclose()
        if keys:
            f.recovery["engine_reregistered_s"] = round(time.time() - f.at, 2)
            self._watch_index = None

    def _progress(self, consumed: int) -> None:
        obs = self.observer
        steps = sum(1 for line in read_outcomes(self.stack.outcomes_path) if line.get("kind") == "step")
        states = " ".join(
            f"{k}:{'up' if s.ready_at else ('down' if not s.alive() else 'starting')}"
            for k, s in self.stack.stages.items()
        )
        self.say(
            f"published {self.feeder.samples}/{self.args.samples}  completions {len(obs.completion_ids)}  "
            f"rewarded {len(obs.reward_completion_ids)}  consumed {consumed}  steps {steps}  "
            f"faults {len(self.faults)}/{len(self.plan)}  dead-lettered {len(obs.dead_sample_ids)}  "
            f"crashes {len(self.crashes)}  [{states}]"
        )

    # --- the report ---------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        obs, stack = self.observer, self.stack
        published = [completion_id(r.id, i) for r in self.feeder.requests for i in range(r.group_size)]
        published_set = set(published)
        lines = read_outcomes(stack.outcomes_path)
        state = read_checkpoint_state(stack.checkpoint_path)
        ckpt_step = state.step if state is not None else None
        steps = committed_steps(lines, ckpt_step)
        trained = Counter(i for line in steps.values() for i in line["ids"])
        dropped: dict[str, set[str]] = defaultdict(set)
        for line in lines:
            if line.get("kind") == "drop":
                dropped[line["reason"]].update(line["ids"])
        buffered: set[str] = set()  # in a (ready or partial) group of the checkpoint
        waiting: set[str] = set()  # a completion waiting for its reward, or the other way round
        # Records at or after the checkpoint's offsets: a restarted learner reads them next.
        unread: set[str] = set()
        if state is not None:
            for topic in (COMPLETIONS.name, REWARDS.name):
                for r in obs.records.get(topic, ()):
                    if r.offset >= state.offsets.get(f"{topic}:{r.partition}", 0) and r.msg is not None:
                        unread.add(r.msg.id if topic == COMPLETIONS.name else r.msg.completion_id)
            waiting |= set(state.buffer.completions) | set(state.buffer.rewards)
            buffered |= {s.completion_id for g in state.buffer.groups.values() for s in g}
            buffered |= {s.completion_id for g in state.buffer.ready for s in g}
        outcome: dict[str, str] = {}
        for i in published_set:
            if i in trained:
                outcome[i] = "trained"
            elif i in buffered:
                outcome[i] = "buffered_in_learner_checkpoint"
            elif i in unread:
                outcome[i] = "unread_by_learner_after_its_checkpoint"
            elif any(i in ids for ids in dropped.values()):
                outcome[i] = "dropped:" + next(r for r, ids in dropped.items() if i in ids)
            elif i in obs.dead_sample_ids:
                outcome[i] = "dead_lettered:" + obs.dead_sample_ids[i][0]
            elif i in waiting:
                outcome[i] = "waiting_in_learner_checkpoint_for_its_pair"
            else:
                outcome[i] = "lost"
        buckets = Counter(outcome.values())
        lost = sorted(i for i, o in outcome.items() if o == "lost")

        completions_by_id: dict[str, list[Completion]] = defaultdict(list)
        for r in obs.records.get(COMPLETIONS.name, ()):
            if isinstance(r.msg, Completion):
                completions_by_id[r.msg.id].append(r.msg)
        rewards_by_key: dict[tuple[str, str], list[Reward]] = defaultdict(list)
        for r in obs.records.get(REWARDS.name, ()):
            if isinstance(r.msg, Reward):
                rewards_by_key[(r.msg.completion_id, r.msg.verifier_version)].append(r.msg)
        routed_ids = {r.msg.id for r in obs.records.get(ROUTED.name, ()) if isinstance(r.msg, PromptRequest)}

        def where(i: str) -> str:
            req = i.rsplit("/", 1)[0]
            if any(k[0] == i for k in rewards_by_key):
                return "rewarded, never reached the learner's outcomes"
            if i in completions_by_id:
                return "completed, never rewarded"
            if req in routed_ids:
                return "routed, never completed"
            return "published, never routed"

        dup_records = {
            PROMPTS.name: _dups(
                [r.msg for r in obs.records.get(PROMPTS.name, ()) if isinstance(r.msg, PromptRequest)],
                lambda m: m.id,
                lambda m: m.id,
            ),
            ROUTED.name: _dups(
                [r.msg for r in obs.records.get(ROUTED.name, ()) if isinstance(r.msg, PromptRequest)],
                lambda m: m.id,
                lambda m: m.id,
            ),
            COMPLETIONS.name: _dups(
                [m for ms in completions_by_id.values() for m in ms],
                lambda m: m.id,
                lambda m: (tuple(m.token_ids), m.policy_version),
            ),
            REWARDS.name: _dups(
                [m for ms in rewards_by_key.values() for m in ms],
                lambda m: (m.completion_id, m.verifier_version),
                lambda m: (m.scalar, m.status.value, m.tokens_hash),
            ),
        }
        reward_dups = {
            f"{cid} [{vv}]": sorted({(m.scalar, m.status.value) for m in ms}, key=str)
            for (cid, vv), ms in rewards_by_key.items()
            if len({(m.scalar, m.status.value, m.tokens_hash) for m in ms}) > 1
        }
        trained_twice = {i: n for i, n in trained.items() if n > 1}
        checksums: dict[int, set[str]] = defaultdict(set)
        for r in obs.records.get(POLICY.name, ()):
            if isinstance(r.msg, PolicyUpdate):
                checksums[r.msg.version].add(r.msg.checksum)
        policy_dups = {v: sorted(c) for v, c in checksums.items() if len(c) > 1}
        # A reward whose tokens are not those of the completion the learner kept (a regenerated completion).
        mismatched = sum(
            1
            for (cid, _), ms in rewards_by_key.items()
            if cid in completions_by_id and len({tuple(c.token_ids) for c in completions_by_id[cid]}) > 1
        )

        dead = Counter(reason for reasons in obs.dead_sample_ids.values() for reason in reasons)
        dlq_records = obs.records.get(DLQ.name, [])
        self._attribute(dlq_records)
        recovery = self._recovery(lines)
        assert self.stack.cfg is not None  # set by start_servers
        kills = Counter(f.kind.split(":", 1)[1] for f in self.faults if f.kind.startswith("kill:"))
        report: dict[str, Any] = {
            "run_id": self.settings.run_id,
            "settings": {
                **{
                    k: (str(v) if isinstance(v, Path) else v)
                    for k, v in asdict(self.settings).items()
                    if k != "extra_env"
                },
                "samples_target": self.args.samples,
                "pause_s": self.args.pause_s,
                "session_timeout_s": self.stack.cfg.kafka.session_timeout_ms / 1000,
                "seed": self.args.seed,
            },
            "wall_s": round(self.wall_s, 1),
            "kills": {k: kills.get(k, 0) for k in KINDS},
            "redis_restarts": sum(f.kind == "redis_restart" for f in self.faults),
            "broker_pauses": sum(f.kind == "broker_pause" for f in self.faults),
            "crashes": self.crashes,
            "samples": {
                "published": len(published_set),
                "published_records": len(published),
                "completed_distinct": len(completions_by_id),
                "rewarded_distinct": len({k[0] for k in rewards_by_key}),
                "outcomes": dict(sorted(buckets.items())),
                "trained": buckets.get("trained", 0),
                "lost": len(lost),
                "lost_examples": {i: where(i) for i in lost[:20]},
                "dead_lettered_by_reason": dict(dead),
            },
            "duplicate_records": dup_records,
            # Issue 22: samples an engine kill interrupted that the next engine continued from
            # their chunk log (Completion.resumed_at_token) rather than generated again.
            "resumed": {
                "samples": sum(1 for cs in completions_by_id.values() if any(c.resumed_at_token for c in cs)),
                "tokens_carried_over": sum(
                    max(c.resumed_at_token or 0 for c in cs) for cs in completions_by_id.values()
                ),
            },
            "duplicate_effects": {
                "total": len(reward_dups) + len(trained_twice) + len(policy_dups),
                "completions_rewarded_twice": len(reward_dups),
                "samples_trained_twice": len(trained_twice),
                "policy_versions_with_two_checksums": len(policy_dups),
                "rewards_for_regenerated_completions": mismatched,
                "examples": {
                    "rewards": dict(list(reward_dups.items())[:10]),
                    "trained": dict(list(trained_twice.items())[:10]),
                    "policy": policy_dups,
                },
            },
            "dead_letters": {
                "records": len(dlq_records) + len(obs.records.get("dlq_other", [])),
                "of_this_run": len(dlq_records),
                "by_stage_error": dict(
                    Counter(
                        f"{r.msg.stage}:{r.msg.error_type}"
                        for r in dlq_records + obs.records.get("dlq_other", [])
                        if r.msg
                    )
                ),
                "examples": [
                    f"{r.msg.stage} {r.msg.source_topic}: {r.msg.error_type}: {r.msg.error[:160]}"
                    for r in dlq_records[:8]
                    if r.msg
                ],
            },
            "learner": {
                "checkpoint_step": ckpt_step,
                "policy_version": state.version if state else None,
                "steps_committed": len(steps),
                "step_lines": sum(1 for x in lines if x.get("kind") == "step"),
                "steps_redone_after_a_kill": sum(1 for x in lines if x.get("kind") == "step")
                - len({x["step"] for x in lines if x.get("kind") == "step"}),
                "counters": dict(state.counters) if state else {},
                "policy_versions_published": sorted(checksums),
            },
            "feeder": {
                "batches": self.feeder.batches,
                "forced_batches": self.feeder.forced,
                "publish_retries": self.feeder.publish_errors,
            },
            "faults": [_fault_json(f) for f in self.faults],
            "recovery_s": recovery,
            "archive": self._archive_check(),
            "exit_codes_at_stop": self.exit_codes,
        }
        report["targets"] = {
            "lost_is_zero": len(lost) == 0,
            "duplicate_effects_is_zero": report["duplicate_effects"]["total"] == 0,
            "every_kind_faulted": all(kills.get(k, 0) for k in KINDS)
            and report["redis_restarts"] > 0
            and report["broker_pauses"] > 0,
        }
        # Good records dead-lettered because a server was briefly away: not lost by the
        # definition above (they carry a reason), but never trained. Reported, not in `pass`.
        infra = {i: r for i, r in obs.dead_sample_ids.items() if any(x.split(":", 1)[1] in INFRA_ERRORS for x in r)}
        report["samples"]["dead_lettered_by_infrastructure_errors"] = len(infra)
        report["targets"]["no_good_sample_dead_lettered_for_an_outage"] = not infra
        report["pass"] = all(
            v for k, v in report["targets"].items() if k != "no_good_sample_dead_lettered_for_an_outage"
        )
        return report

    def _attribute(self, dlq_records: list[Any]) -> None:
        for r in dlq_records:
            before = [f for f in self.faults if f.at <= r.timestamp]
            if before:
                before[-1].dead_letters_after += 1

    def _recovery(self, lines: list[dict[str, Any]]) -> dict[str, Any]:
        obs = self.observer
        step_times = sorted(x["t"] for x in lines if x.get("kind") == "step")
        files = (
            sorted(p.stat().st_mtime for p in self.stack.archive_root.rglob("*.parquet"))
            if self.stack.archive_root.exists()
            else []
        )

        def first(times: list[float], t: float) -> float | None:
            return next((x for x in times if x > t), None)

        def since(t: float | None, t0: float) -> float | None:
            return None if t is None else round(t - t0, 2)

        for f in self.faults:
            if f.kind.startswith("kill:"):
                stage = f.kind.split(":", 1)[1]
                f.recovery["restarted_s"] = since(f.restarted_at or None, f.at)
                f.recovery["ready_s"] = since(f.ready_at or None, f.at)
                after = f.ready_at or f.at
                if stage in OUTPUT_TOPIC:
                    resumed = obs.first_after(OUTPUT_TOPIC[stage], after)
                elif stage == "learner":
                    resumed = first(step_times, after)
                else:
                    resumed = first(files, after)
                f.recovery["output_resumed_s"] = since(resumed, f.at)
            else:
                ref = f.ended_at or f.at
                f.recovery["fault_lasted_s"] = round(ref - f.at, 2)
                f.recovery["completions_resumed_s"] = since(obs.first_after(COMPLETIONS.name, ref), f.at)
                f.recovery["rewards_resumed_s"] = since(obs.first_after(REWARDS.name, ref), f.at)
                f.recovery["learner_step_resumed_s"] = since(first(step_times, ref), f.at)
        out: dict[str, Any] = {}
        for kind in FAULT_KINDS:
            fs = [f for f in self.faults if f.kind == kind]
            if not fs:
                continue
            keys = {k for f in fs for k in f.recovery}
            out[kind] = {k: _summary([v for f in fs if (v := f.recovery.get(k)) is not None]) for k in sorted(keys)}
        return out

    def _archive_check(self) -> dict[str, Any]:
        """Each archived (topic, partition, offset) once, and every observed record of the run archived."""
        import pyarrow.parquet as pq

        from plumbing.run_log import run_dir_name

        run_dir = self.stack.archive_root / run_dir_name(self.settings.run_id)
        out: dict[str, Any] = {}
        for topic in (PROMPTS.name, COMPLETIONS.name, REWARDS.name, POLICY.name):
            seen: Counter[tuple[int, int]] = Counter()
            for path in sorted((run_dir / topic).glob("*.parquet")) if (run_dir / topic).exists() else []:
                t = pq.read_table(path, columns=["partition", "offset"])
                seen.update(zip(t.column("partition").to_pylist(), t.column("offset").to_pylist(), strict=True))
            observed = {(r.partition, r.offset) for r in self.observer.records.get(topic, ())}
            out[topic] = {
                "archived": sum(seen.values()),
                "observed": len(observed),
                "archived_twice": sum(1 for n in seen.values() if n > 1),
                "missing": len(observed - set(seen)),
            }
        return out


def _dups(msgs: list[Any], key: Any, content: Any) -> dict[str, int]:
    """Records, distinct keys, redeliveries with identical content, and copies whose content differs."""
    by: dict[Any, list[Any]] = defaultdict(list)
    for m in msgs:
        by[key(m)].append(content(m))
    identical = sum(len(v) - len(set(v)) for v in by.values())
    differing = sum(len(set(v)) - 1 for v in by.values())
    return {
        "records": len(msgs),
        "distinct": len(by),
        "identical_redeliveries": identical,
        "differing_content": differing,
    }


def _summary(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"n": len(values), "median": round(statistics.median(values), 2), "max": round(max(values), 2)}


def _fault_json(f: Fault) -> dict[str, Any]:
    return {
        "kind": f.kind,
        "at_s": f.at_s,
        "target_busy": f.target_busy,
        "processes_killed": f.processes_killed,
        "recovery": f.recovery,
        "dead_letters_after": f.dead_letters_after,
        "crashes_after": f.crashes_after,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=1000, help="samples to publish (rounded up to whole batches)")
    p.add_argument("--faults", type=int, default=12, help="faults to inject (at least one of each of the 7 kinds)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--pause-s", type=float, default=10.0, help="broker SIGSTOP length (longer than the 6 s session timeout)"
    )
    p.add_argument("--min-gap-s", type=float, default=10.0, help="seconds between faults at least")
    p.add_argument(
        "--busy-wait-s", type=float, default=30.0, help="a due fault waits this long for its target to be busy"
    )
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--prompts-per-batch", type=int, default=8)
    p.add_argument("--groups-per-step", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument(
        "--min-tokens",
        type=int,
        default=0,
        help="> 0: samples run this long (no answer grammar), so an engine kill lands mid-sample and is resumed",
    )
    p.add_argument("--max-policy-lag", type=int, default=1)
    p.add_argument("--group-timeout-s", type=float, default=40.0)
    p.add_argument(
        "--drain-idle-s", type=float, default=90.0, help="end once the learner consumed nothing new this long"
    )
    p.add_argument("--drain-timeout-s", type=float, default=400.0)
    p.add_argument("--max-wall-s", type=float, default=3600.0)
    p.add_argument("--progress-s", type=float, default=10.0)
    p.add_argument("--run-id", default="")
    p.add_argument("--work-dir", default="", help="state, logs and archive (default: artifacts/chaos/<run id>)")
    p.add_argument("--keep", action="store_true", help="keep the policy folders of the work dir")
    p.add_argument("--out", default=str(ARTIFACTS / "chaos_report.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    report = asyncio.run(ChaosRun(args).run())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    s, d = report["samples"], report["duplicate_effects"]
    print(
        f"\nkills {report['kills']}, redis restarts {report['redis_restarts']}, "
        f"broker pauses {report['broker_pauses']}, "
        f"crashes {len(report['crashes'])}, "
        f"resumed samples {report['resumed']['samples']} ({report['resumed']['tokens_carried_over']} tokens)"
    )
    print(f"samples: published {s['published']}, outcomes {s['outcomes']}, LOST {s['lost']}")
    duplicates = {
        t: v["identical_redeliveries"] + v["differing_content"] for t, v in report["duplicate_records"].items()
    }
    print(
        f"duplicate records: {duplicates}, "
        f"duplicate effects {d['total']}; dead letters {report['dead_letters']['by_stage_error']}"
    )
    print(f"recovery: {json.dumps(report['recovery_s'])}")
    print(f"{'PASS' if report['pass'] else 'FAIL'} {report['targets']}; report: {out}")
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
