"""The rollout workload the engine benchmarks send, and the pinned engine processes they send it to.

One policy version's worth of traffic at one context size (tokens), on fresh text:

- multi-turn agentic sessions: every turn extends the previous turn's whole context
  (its prompt + the real answer + a new tool message) and is sent once the previous
  turn finished;
- GRPO groups of G samples sent as G separate requests (one group id) under a system
  prompt shared by the whole phase;
- a share of both (`structured_share`) whose outputs are JSON tool calls under a JSON
  schema (checked by the verifier's `format` reward); the rest is free text scored by
  the `regex` reward (does the answer name a tool word).

`Workload.run(send)` drives it through any `send(request) -> answer text`: Kafka and
the whole pipeline (perf/bench_matrix.py, perf/routing_bench.py) or an offline engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from redis.asyncio import Redis

from plumbing.config import Config
from plumbing.prefix_cache.index import PrefixIndex
from plumbing.security import server_env
from schemas import ChatMessage, Grammar, GrammarKind, PromptRequest, SamplingParams

ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "search result file line error value table index cache token block query answer tool call step plan note "
    "config server client request reply stream batch group policy model weight reward score check test"
).split()
TOOLS = ["search", "read_file", "run_tests", "write_note"]
TOOL_CALL_SCHEMA = {
    "type": "object",
    "properties": {"tool": {"enum": TOOLS}, "query": {"type": "string", "maxLength": 24}},
    "required": ["tool", "query"],
    "additionalProperties": False,
}
TOOL_CALL = Grammar(GrammarKind.JSON_SCHEMA, json.dumps(TOOL_CALL_SCHEMA, separators=(",", ":")))
# The free-text reward: the answer names one of the workload's tool words.
MENTIONS_TOOL = r"(?is).*\b(search|file|test|tool|note)\b.*"

Send = Callable[[PromptRequest], Awaitable[str]]


def filler(rng: random.Random, tokens: int) -> str:
    """About `tokens` tokens of text: each of these words is one token of SmolLM2's tokenizer
    (measured: 6,301 words, 6,301 tokens; an earlier estimate of 1.3 tokens per word made
    every prompt 23 % shorter than its context)."""
    return " ".join(rng.choice(WORDS) for _ in range(int(tokens)))


# Shares of the context: the phase's system prompt, a session's task, each tool output
# that extends a session, a group's question.
SYSTEM_SHARE, TASK_SHARE, TOOL_SHARE, QUESTION_SHARE = 0.25, 0.4, 0.08, 0.65
# Chat-template and label tokens per message at most ("<|im_start|>user\nTool output: ...").
MESSAGE_OVERHEAD = 16


@dataclass(frozen=True)
class Shape:
    """How much of each kind of traffic one phase sends."""

    context: int
    sessions: int = 4
    turns: int = 4
    groups: int = 2
    group_size: int = 8
    max_tokens: int = 32
    structured_share: float = 0.0
    tasks: bool = False  # give every request a task the verifier scores (regex / format)

    @property
    def requests(self) -> int:
        return self.sessions * self.turns + self.groups * self.group_size

    def last_turn_tokens(self, turns: int) -> int:
        """An upper estimate of a session's last prompt plus its answer, in tokens."""
        shares = SYSTEM_SHARE + TASK_SHARE + TOOL_SHARE * (turns - 1)
        messages = 2 * turns  # system + task, then an answer and a tool output per earlier turn
        return int(self.context * shares) + turns * self.max_tokens + MESSAGE_OVERHEAD * messages

    def fitted(self, max_model_len: int) -> Shape:
        """This shape with as many of its turns as a session's last turn fits in `max_model_len`
        (at 8,192 tokens on SmolLM2's 8,192: 4 of 6)."""
        turns = self.turns
        while turns > 1 and self.last_turn_tokens(turns) > max_model_len:
            turns -= 1
        return dataclasses.replace(self, turns=turns)

    def structured(self, index: int, count: int) -> bool:
        """Whether item `index` of `count` (sessions or groups) asks for JSON tool calls."""
        return index < round(self.structured_share * count)


class Workload:
    """One phase of sessions and groups on text drawn from `seed`; see the module doc."""

    def __init__(self, shape: Shape, run_id: str, seed: int) -> None:
        self.shape, self.run_id = shape, run_id
        self.rng = random.Random(seed)

    def _request(self, messages: list[ChatMessage], structured: bool, **ids: object) -> PromptRequest:
        extra: dict[str, object] = {}
        if self.shape.tasks:
            extra = (
                {"grammar": TOOL_CALL, "task": "format"}
                if structured
                else {"task": "regex", "reference": MENTIONS_TOOL}
            )
        elif structured:
            extra = {"grammar": TOOL_CALL}
        return PromptRequest(
            run_id=self.run_id,
            messages=list(messages),
            sampling=SamplingParams(max_tokens=self.shape.max_tokens),
            **ids,  # type: ignore[arg-type]
            **extra,  # type: ignore[arg-type]
        )

    async def session(self, system: str, send: Send, structured: bool) -> None:
        """Turns that each extend the previous one's context."""
        c = self.shape.context
        sid = uuid.uuid4().hex[:12]
        ask = " Reply with one JSON tool call." if structured else ""
        task = "Task: " + filler(self.rng, int(c * TASK_SHARE)) + ask
        messages = [ChatMessage("system", system), ChatMessage("user", task)]
        for turn in range(self.shape.turns):
            answer = await send(self._request(messages, structured, session_id=sid, turn_index=turn))
            messages += [
                ChatMessage("assistant", answer),
                ChatMessage("user", "Tool output: " + filler(self.rng, int(c * TOOL_SHARE)) + ask),
            ]

    async def group(self, system: str, send: Send, structured: bool) -> None:
        """G requests of one prompt at once."""
        gid = uuid.uuid4().hex[:12]
        ask = " Reply with one JSON tool call." if structured else ""
        question = filler(self.rng, int(self.shape.context * QUESTION_SHARE)) + ask
        msgs = [ChatMessage("system", system), ChatMessage("user", question)]
        reqs = [self._request(msgs, structured, group_id=gid) for _ in range(self.shape.group_size)]
        await asyncio.gather(*(send(r) for r in reqs))

    async def run(self, send: Send) -> float:
        """Send the whole phase; returns its wall seconds."""
        s = self.shape
        # Shared across this phase's sessions and groups: a system prompt of a quarter of the context.
        system = "You are an agent. Rules: " + filler(self.rng, int(s.context * SYSTEM_SHARE))
        t0 = time.time()
        await asyncio.gather(
            *(self.session(system, send, s.structured(i, s.sessions)) for i in range(s.sessions)),
            *(self.group(system, send, s.structured(i, s.groups)) for i in range(s.groups)),
        )
        return time.time() - t0


def pinned(core: int, cmd: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """`cmd` and `env` for a process on one core: taskset, and vLLM's OpenMP threads bound to it."""
    return ["taskset", "-c", str(core), *cmd], {**env, "VLLM_CPU_OMP_THREADS_BIND": str(core)}


def engine_command(extra: list[str] | None = None) -> list[str]:
    """`primerl engine --no-router` with this interpreter (the router runs elsewhere)."""
    return [sys.executable, "-m", "primerl", "engine", "--no-router", *(extra or [])]


def engine_env(cfg: Config, kv_cache_gib: int = 2) -> dict[str, str]:
    """The environment of an engine worker on `cfg`'s servers."""
    return {
        **os.environ,
        **server_env(cfg),
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        "TOKENIZERS_PARALLELISM": "false",
    }


async def wait_workers(
    redis: Redis, cfg: Config, alive: Callable[[], bool], workers: int = 2, timeout_s: float = 400
) -> None:
    """Until `workers` engine workers are in the registry holding every rollout.routed partition."""
    from schemas.topics import ROUTED

    index = PrefixIndex(redis, cfg.routing.ttl_s)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("an engine exited during start-up; see its log")
        live = [w for w in await index.live_workers() if w.partitions]
        if len(live) == workers and sum(len(w.partitions) for w in live) == ROUTED.partitions:
            return
        await asyncio.sleep(1)
    raise TimeoutError("engines not ready")
