"""The verifier worker: rollout.completions and rollout.trajectories -> score -> sign -> rollout.rewards.

Consumer group `verifier`, one runner for both input topics, each decoded as its own
type (a second member of the group would make every start a rebalance, and records
finished across a rebalance are redelivered). Multi-turn sessions (issue 23) are scored
once, finished: a completion with `session` set on rollout.completions is a turn for the
env hub and is skipped (counted); a Trajectory (the env hub's signature on the wrapper,
then its completion's engine signature and the layout check of plumbing/sessions.py) is
scored on its final answer, and its reward adds
the session's tool use: the env's components under `tool.<name>`, `turns` (the model
turns the signed layout holds), and the signed tool calls as JSON under trace
`tool_calls`. That reward binds the last turn's completion exactly as a single turn's does.

One reward per completion and verifier version: the reward
id is derived from both, and a Redis ledger skips completions already rewarded, so a
redelivered completion never yields a second reward. aiokafka, not faust: scoring is
stateless per message, and faust-streaming pins click < 8.4, which vLLM's
huggingface-hub (click >= 8.4.2) cannot share one environment with.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import msgspec
from aiokafka.structs import ConsumerRecord
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from plumbing.config import Config
from plumbing.consumer import ConsumerRunner, ConsumerStage
from plumbing.custody import decoded_text, engine_keyring, engine_tokenizer, envhub_keyring
from plumbing.dead_letters import DeadLetters
from plumbing.kafka import Publisher
from plumbing.ledger import Ledger
from plumbing.sessions import check_layout
from plumbing.trust import Keyring, Rejected, Signer, prompt_hash, token_hash, verify_completion, verify_trajectory
from schemas import Completion, Reward, Trajectory
from schemas.sessions import ToolTrace
from schemas.topics import COMPLETIONS, REWARDS, TRAJECTORIES
from verifier_workers.metrics import VerifierMetrics
from verifier_workers.rewards import RewardFn, score_completion

log = logging.getLogger(__name__)

VERIFIER_GROUP = "verifier"
TOOL_CALLS_MAX_BYTES = 8192  # trace["tool_calls"]: calls past this are counted in trace["tool_calls_dropped"]
# Tool-use components taken from one trajectory wrapper: signed by the env hub, and bounded
# all the same (custody can be off, and an env's report is not the reward's to grow).
_TOOL_COMPONENTS_MAX = 32
_FIELD_MAX = 256  # characters kept of a call's url or error


def tool_calls_trace(calls: list[ToolTrace]) -> dict[str, str]:
    """The calls as compact JSON (trace key `tool_calls`), whole calls only, capped at
    TOOL_CALLS_MAX_BYTES; how many did not fit goes under `tool_calls_dropped`."""
    out: list[str] = []
    size = 2  # the brackets
    for call in calls:
        item: dict[str, object] = {"turn": call.turn_index, "tool": call.tool[:_FIELD_MAX], "ok": call.ok}
        if call.url:  # a browser fetch
            item |= {"url": call.url[:_FIELD_MAX], "status": call.status, "bytes": call.bytes}
        if math.isfinite(call.latency_ms):
            item["latency_ms"] = round(call.latency_ms, 1)
        if call.error:
            item["error"] = call.error[:_FIELD_MAX]
        text = json.dumps(item, separators=(",", ":"), ensure_ascii=False)
        if size + len(text.encode()) + 1 > TOOL_CALLS_MAX_BYTES:
            break
        out.append(text)
        size += len(text.encode()) + 1
    trace = {"tool_calls": "[" + ",".join(out) + "]"}
    if len(out) < len(calls):
        trace["tool_calls_dropped"] = str(len(calls) - len(out))
    return trace


def session_components(t: Trajectory) -> dict[str, float]:
    """The session's reward components besides the answer's: the env's tool-use ones as
    `tool.<name>` (finite values only, at most _TOOL_COMPONENTS_MAX),
    and `turns`, counted from the signed layout (model segments + the last turn) rather than
    taken from the wrapper's `turns`."""
    s = t.completion.session
    assert s is not None
    tool = {f"tool.{k[:64]}": float(v) for k, v in sorted(t.components.items()) if math.isfinite(v)}
    turns = 1 + sum(seg.kind == "model" for seg in s.segments)
    return dict(list(tool.items())[:_TOOL_COMPONENTS_MAX]) | {"turns": float(turns)}


def reward_id(completion_id: str, verifier_id: str, version: str) -> str:
    """Deterministic: the same completion scored by the same verifier version has one id."""
    return hashlib.sha256(f"{completion_id}|{verifier_id}|{version}".encode()).hexdigest()[:32]


@dataclass
class VerifierWorker(ConsumerStage):
    """Scores completions with the reward function each one's task names; see the module doc."""

    cfg: Config
    registry_fns: dict[str, RewardFn]
    signer: Signer
    publisher: Publisher
    redis: Redis
    registry: CollectorRegistry
    engine_keys: Keyring | None = None  # None: from the config (custody.require_engine_signatures)
    envhub_keys: Keyring | None = None  # likewise, for the trajectories' env hub signatures
    tokenizer: Any = None  # None: the engine's, when custody.check_text_tokens

    def __post_init__(self) -> None:
        v = self.cfg.verifier
        custody = self.cfg.custody
        if self.engine_keys is None and custody.require_engine_signatures:
            self.engine_keys = engine_keyring(self.cfg)
        if self.envhub_keys is None and custody.require_engine_signatures:
            self.envhub_keys = envhub_keyring(self.cfg)
        if self.tokenizer is None and custody.check_text_tokens:
            self.tokenizer = engine_tokenizer(self.cfg)
        self.metrics = VerifierMetrics(self.registry)
        self.ledger = Ledger(self.redis, f"verifier:{v.verifier_id}:{v.version}")
        self.runner = ConsumerRunner(
            self.cfg,
            topics=[COMPLETIONS.name, TRAJECTORIES.name],
            group_id=VERIFIER_GROUP,
            message_type=Completion,
            message_types={TRAJECTORIES.name: Trajectory},
            handler=self.handle,
            dead_letters=DeadLetters.from_config(self.cfg, self.publisher, "verifier", self.registry),
            registry=self.registry,
            max_in_flight=v.max_in_flight,
        )

    async def handle(self, msg: Completion | Trajectory, _record: ConsumerRecord) -> None:
        """Check custody, score, sign and publish one reward; returns once the broker acked it.

        Before the ledger claim: a forged completion is dead-lettered without claiming its
        id, so the genuine one with that id is still scored when it comes.
        """
        if isinstance(msg, Trajectory):
            await self.handle_trajectory(msg)
            return
        completion = msg
        if completion.session is not None:
            self.metrics.session_turns.inc()  # a turn: scored with its session, from rollout.trajectories
            return
        completion = self._checked(completion, session=False)
        async with self.ledger.claim(completion.id) as fresh:
            if not fresh:
                self.metrics.duplicates.inc()
                return
            await self._reward(completion)

    async def handle_trajectory(self, trajectory: Trajectory) -> None:
        """One reward for a finished session, bound to its last turn's completion (see the module doc)."""
        try:
            verify_trajectory(trajectory, self.envhub_keys)
        except Rejected as err:
            self.metrics.rejected.labels(f"trajectory_{err.reason}").inc()
            raise
        completion = self._checked(trajectory.completion, session=True)
        async with self.ledger.claim(completion.id) as fresh:
            if not fresh:
                self.metrics.duplicates.inc()
                return
            assert completion.session is not None  # check_layout
            await self._reward(completion, session_components(trajectory), tool_calls_trace(completion.session.calls))
            self.metrics.trajectories.labels(trajectory.done_reason).inc()

    def _checked(self, completion: Completion, *, session: bool) -> Completion:
        """Custody (engine signature, then a session's layout) and the text scored; Rejected is
        dead-lettered by the runner, with the reason in the letter."""
        try:
            verify_completion(completion, self.engine_keys)
            if session:
                check_layout(completion)
            if self.tokenizer is not None:
                # Score what the learner trains on: the text its token_ids decode to.
                completion = msgspec.structs.replace(completion, text=decoded_text(completion, self.tokenizer))
        except Rejected as err:
            self.metrics.rejected.labels(err.reason).inc()
            raise
        return completion

    async def _reward(
        self,
        completion: Completion,
        extra_components: dict[str, float] | None = None,
        extra_trace: dict[str, str] | None = None,
    ) -> None:
        t0 = time.perf_counter()
        # An unknown task raises UnknownTask: bad input for the dead-letter topic, not a zero reward.
        score = await score_completion(self.registry_fns, completion)
        fn = self.registry_fns[completion.task]
        self.metrics.scoring_seconds.labels(completion.task).observe(time.perf_counter() - t0)
        if "sandbox_kill" in score.trace:
            self.metrics.sandbox_kills.labels(score.trace["sandbox_kill"]).inc()
        v = self.cfg.verifier
        reward = self.signer.sign(
            Reward(
                id=reward_id(completion.id, v.verifier_id, v.version),
                run_id=completion.run_id,
                completion_id=completion.id,
                request_id=completion.request_id,
                group_id=completion.group_id,
                prompt_hash=prompt_hash(completion.prompt),
                tokens_hash=token_hash(completion.token_ids),
                policy_version=completion.policy_version,
                verifier_id=v.verifier_id,
                verifier_version=f"{v.version}/{fn.name}@{fn.version}",
                # A session's tool-use components and calls ride along for analysis; the scalar
                # stays the answer's: how much tool use should count is a reward-design choice
                # the task's reward function should make, not a side effect of the env's report.
                components=score.components | (extra_components or {}),
                scalar=score.scalar,
                status=score.status,
                trace=score.trace | (extra_trace or {}),
            )
        )
        self.metrics.signed.inc()
        await self.publisher.publish(REWARDS.name, reward, key=completion.group_id.encode())
        await self.ledger.mark(completion.id)
        self.metrics.rewards.labels(completion.task, reward.status.value).inc()
