"""The session stage: rollout.completions (session turns) -> tools -> the next turn on rollout.prompts, or
the finished session on rollout.trajectories.

Consumer group `envhub`. For each completion of an environment session (`session` set;
every other completion is skipped), it checks the engine's signature, lets the
environment step on the model's turn (tool calls run there; a malformed call comes
back as an observation, never as an error), and then either

- publishes the next turn: a PromptRequest whose `prompt_token_ids` are this turn's
  prompt, its sampled tokens and the tokenized tool response (envhub/turns.py), with
  the session's layout extended, the same group, session id and routing key, and
  `turn_index + 1`; or
- publishes the Trajectory: the last turn's completion exactly as the engine signed
  it, once the environment says done, the turn limit is reached, or the next prompt
  would not fit the model's context. The env hub signs the wrapper (its key under
  `<state_dir>/keys/envhub`), so verifiers take its tool-use components as its own.

Idempotent like every stage: a Redis ledger on the completion id, and the next
request's id derived from it, so a redelivered turn continues its session once.
"""

from __future__ import annotations

import logging
from collections import Counter as Tally
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiokafka.structs import ConsumerRecord
from prometheus_client import CollectorRegistry, Counter, Histogram
from redis.asyncio import Redis

from envhub.protocol import EnvContext, Environment
from envhub.registry import load_env
from envhub.turns import TurnTemplate, extended_session, next_request_id
from plumbing.config import Config
from plumbing.consumer import ConsumerRunner, ConsumerStage
from plumbing.custody import engine_keyring, envhub_signer
from plumbing.dead_letters import DeadLetters
from plumbing.kafka import Publisher
from plumbing.ledger import Ledger
from plumbing.sessions import check_layout
from plumbing.trust import Keyring, Signer, verify_completion
from schemas import Completion, PromptRequest, SamplingParams, ToolTrace, Trajectory
from schemas.topics import COMPLETIONS, PROMPTS, TRAJECTORIES
from schemas.trajectories import DoneReason

log = logging.getLogger(__name__)

ENVHUB_GROUP = "envhub"
TOOL_CLOSE = "</tool>"


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.turns = Counter(
            "primerl_envhub_turns",
            "Session turns handled, by environment and outcome",
            ["env", "outcome"],
            registry=registry,
        )
        self.sessions = Counter(
            "primerl_envhub_sessions_finished",
            "Sessions finished, by environment and reason",
            ["env", "reason"],
            registry=registry,
        )
        self.tool_calls = Counter(
            "primerl_envhub_tool_calls", "Tool calls run, by tool and result", ["tool", "ok"], registry=registry
        )
        self.skipped = Counter(
            "primerl_envhub_completions_skipped", "Completions without a session (not the env hub's)", registry=registry
        )
        self.duplicates = Counter(
            "primerl_envhub_duplicates", "Turns already handled (redeliveries)", registry=registry
        )
        self.step_seconds = Histogram(
            "primerl_envhub_step_seconds", "Environment step time (tool calls included)", ["env"], registry=registry
        )


def trajectory_components(calls: list[ToolTrace]) -> dict[str, float]:
    """Tool-use components of a finished session, from its call records: totals, and calls and
    successes per tool (`calls.browser`, `ok.browser`). The verifier adds `turns` itself, from
    the signed layout."""
    tools = Tally(c.tool for c in calls if c.tool)
    ok = Tally(c.tool for c in calls if c.tool and c.ok)
    return {
        "tool_calls": float(len(calls)),
        "tool_errors": float(sum(not c.ok for c in calls)),
        "malformed_calls": float(sum(not c.tool for c in calls)),
        **{f"calls.{name}": float(n) for name, n in sorted(tools.items())},
        **{f"ok.{name}": float(ok[name]) for name in sorted(tools)},
    }


@dataclass
class EnvhubWorker(ConsumerStage):
    """Runs environment sessions turn by turn; see the module doc."""

    cfg: Config
    tokenizer: Any
    max_model_len: int
    publisher: Publisher
    redis: Redis
    registry: CollectorRegistry
    ctx: EnvContext
    engine_keys: Keyring | None = None  # None: from the config (custody.require_engine_signatures)
    signer: Signer | None = None  # None: the state dir's env hub key (made on first use)
    envs: dict[str, Environment] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.engine_keys is None and self.cfg.custody.require_engine_signatures:
            self.engine_keys = engine_keyring(self.cfg)
        if self.signer is None:
            self.signer = envhub_signer(self.cfg)
        self.template = TurnTemplate(self.tokenizer, self.cfg.envhub.tool_role)
        self.metrics = _Metrics(self.registry)
        self.ledger = Ledger(self.redis, ENVHUB_GROUP)
        self.runner = ConsumerRunner(
            self.cfg,
            topics=[COMPLETIONS.name],
            group_id=ENVHUB_GROUP,
            message_type=Completion,
            handler=self.handle,
            dead_letters=DeadLetters.from_config(self.cfg, self.publisher, ENVHUB_GROUP, self.registry),
            registry=self.registry,
            max_in_flight=self.cfg.envhub.max_in_flight,
        )

    def env(self, name: str) -> Environment:
        """The environment named by a session (loaded once; UnknownEnv is the record's fault)."""
        env = self.envs.get(name)
        if env is None:
            env = self.envs[name] = load_env(name, self.ctx)
        return env

    async def aclose(self) -> None:
        """Release what the environments hold (the browser's HTTP session)."""
        for env in self.envs.values():
            close = getattr(env, "aclose", None)
            if close is not None:
                await close()

    async def handle(self, completion: Completion, _record: ConsumerRecord) -> None:
        """One turn: step the environment, publish the next turn or the trajectory; returns once acked."""
        session = completion.session
        if session is None:
            self.metrics.skipped.inc()
            return
        verify_completion(completion, self.engine_keys)
        check_layout(completion)  # the next turn extends this layout: it must describe the tokens
        env = self.env(session.env)  # before the claim: an unknown env is dead-lettered, not claimed
        async with self.ledger.claim(completion.id) as fresh:
            if not fresh:
                self.metrics.duplicates.inc()
                return
            await self._turn(env, completion)
            await self.ledger.mark(completion.id)

    async def _turn(self, env: Environment, c: Completion) -> None:
        session = c.session
        assert session is not None
        sampling = session.sampling
        # vLLM drops a stop string from the text (not from the tokens): a call cut at
        # `</tool>` is complete, and the environment is told so.
        stopped = sampling is not None and TOOL_CLOSE in sampling.stop and c.finish_reason == "stop"
        with self.metrics.step_seconds.labels(session.env).time():
            result = await env.step(session.state, c.turn_index, c.text, stopped_at_close=stopped)
        for call in result.calls:
            self.metrics.tool_calls.labels(call.tool or "malformed", str(call.ok).lower()).inc()
        calls = [*session.calls, *result.calls]
        components = dict(session.components)
        for k, v in result.components.items():
            components[k] = components.get(k, 0.0) + v
        turns = c.turn_index + 1
        reason: DoneReason | None = None
        if result.done or result.observation is None:
            reason = "env_done"
        elif turns >= min(session.max_turns, self.cfg.envhub.max_turns):
            reason = "turn_limit"
        obs_ids: list[int] = []
        if reason is None:
            obs_ids = self.template.observation_ids(c.token_ids, result.observation or "")
            max_tokens = (sampling.max_tokens if sampling is not None else 0) or 1
            if len(c.prompt_token_ids) + len(c.token_ids) + len(obs_ids) + max_tokens > self.max_model_len:
                reason = "context_full"
        if reason is not None:
            await self._finish(c, reason, turns, calls, components)
            return
        nxt = msgspec.structs.replace(
            extended_session(c, obs_ids), calls=calls, components=components, state=result.state
        )
        req = PromptRequest(
            id=next_request_id(c.id),
            run_id=c.run_id,
            prompt_token_ids=[*c.prompt_token_ids, *c.token_ids, *obs_ids],
            group_id=c.group_id,
            group_size=1,
            session_id=c.session_id,
            turn_index=turns,
            sampling=sampling or SamplingParams(),
            grammar=c.grammar,
            task=c.task,
            reference=c.reference,
            # Later turns never run on an older policy than the one that served this turn.
            min_policy_version=c.policy_version,
            session=nxt,
        )
        await self.publisher.publish(PROMPTS.name, req, key=req.routing_key())
        self.metrics.turns.labels(session.env, "continued").inc()

    async def _finish(
        self, c: Completion, reason: DoneReason, turns: int, calls: list[ToolTrace], env: dict[str, float]
    ) -> None:
        session = c.session
        assert session is not None
        # `calls` may hold tool calls of the last step, which the signed completion (sampled
        # before them) cannot: the components count them, the verifier's trace shows the signed ones.
        assert self.signer is not None  # __post_init__
        trajectory = self.signer.sign(
            Trajectory(
                id=c.id,
                run_id=c.run_id,
                completion=c,
                done_reason=reason,
                turns=turns,
                components={**trajectory_components(calls), **{f"env.{k}": v for k, v in sorted(env.items())}},
            )
        )
        await self.publisher.publish(TRAJECTORIES.name, trajectory, key=c.group_id.encode())
        self.metrics.turns.labels(session.env, "finished").inc()
        self.metrics.sessions.labels(session.env, reason).inc()
