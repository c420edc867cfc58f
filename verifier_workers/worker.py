"""The verifier worker: rollout.completions -> score -> sign -> rollout.rewards.

Consumer group `verifier`. One reward per completion and verifier version: the reward
id is derived from both, and a Redis ledger skips completions already rewarded, so a
redelivered completion never yields a second reward. aiokafka, not faust: scoring is
stateless per message, and faust-streaming pins click < 8.4, which vLLM's
huggingface-hub (click >= 8.4.2) cannot share one environment with.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import msgspec
from aiokafka.structs import ConsumerRecord
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from plumbing.config import Config
from plumbing.consumer import ConsumerRunner, ConsumerStage
from plumbing.custody import decoded_text, engine_keyring, engine_tokenizer
from plumbing.dead_letters import DeadLetters
from plumbing.kafka import Publisher
from plumbing.ledger import Ledger
from plumbing.trust import Keyring, Rejected, Signer, prompt_hash, token_hash, verify_completion
from schemas import Completion, Reward
from schemas.topics import COMPLETIONS, REWARDS
from verifier_workers.metrics import VerifierMetrics
from verifier_workers.rewards import RewardFn, score_completion

log = logging.getLogger(__name__)

VERIFIER_GROUP = "verifier"


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
    tokenizer: Any = None  # None: the engine's, when custody.check_text_tokens

    def __post_init__(self) -> None:
        v = self.cfg.verifier
        custody = self.cfg.custody
        if self.engine_keys is None and custody.require_engine_signatures:
            self.engine_keys = engine_keyring(self.cfg)
        if self.tokenizer is None and custody.check_text_tokens:
            self.tokenizer = engine_tokenizer(self.cfg)
        self.metrics = VerifierMetrics(self.registry)
        self.ledger = Ledger(self.redis, f"verifier:{v.verifier_id}:{v.version}")
        self.runner = ConsumerRunner(
            self.cfg,
            topics=[COMPLETIONS.name],
            group_id=VERIFIER_GROUP,
            message_type=Completion,
            handler=self.handle,
            dead_letters=DeadLetters.from_config(self.cfg, self.publisher, "verifier", self.registry),
            registry=self.registry,
            max_in_flight=v.max_in_flight,
        )

    async def handle(self, completion: Completion, _record: ConsumerRecord) -> None:
        """Check custody, score, sign and publish one reward; returns once the broker acked it.

        Before the ledger claim: a forged completion is dead-lettered without claiming its
        id, so the genuine one with that id is still scored when it comes.
        """
        try:
            verify_completion(completion, self.engine_keys)
            if self.tokenizer is not None:
                # Score what the learner trains on: the text its token_ids decode to.
                completion = msgspec.structs.replace(completion, text=decoded_text(completion, self.tokenizer))
        except Rejected as err:
            self.metrics.rejected.labels(err.reason).inc()
            raise  # dead-lettered by the runner, with the reason in the letter
        async with self.ledger.claim(completion.id) as fresh:
            if not fresh:
                self.metrics.duplicates.inc()
                return
            await self._reward(completion)

    async def _reward(self, completion: Completion) -> None:
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
                components=score.components,
                scalar=score.scalar,
                status=score.status,
                trace=score.trace,
            )
        )
        self.metrics.signed.inc()
        await self.publisher.publish(REWARDS.name, reward, key=completion.group_id.encode())
        await self.ledger.mark(completion.id)
        self.metrics.rewards.labels(completion.task, reward.status.value).inc()
