"""Who reads and writes what: the least-privilege map of every stage's topics, groups and Redis keys.

One principal per kind of process (the Kafka user `User:<name>` and the Redis ACL user
`<name>`). `scripts/render_acls.py` turns this map into deploy/acl/kafka-acls.sh (for
Apache Kafka's kafka-acls.sh) and deploy/acl/redis-users.acl; tests/test_access_map.py
checks it against the topic registry, the consumer groups and key builders of the code,
so a new topic or key cannot go unmapped.

Read from the code (publish / subscribe / Redis calls of each stage):
- router: rollout.prompts -> rollout.routed; reads the registry and held blocks, adds
  pending blocks and load (plumbing/prefix_cache/index.py).
- engine: rollout.routed (group engine) and rollout.deferred (group deferral) ->
  chunks, completions, deferred, prompts (released deferrals); follows rollout.policy
  without a group; heartbeats its registry entry, blocks and load; ledgers `engine`
  and `policy-dead-letters`; reads back a redelivered request's chunks (no group) and
  keeps where they start under primerl:resume:. An engine embeds a router by default, so it also holds
  the router's rights (routing.embedded = false drops the need).
- envhub: rollout.completions (group envhub; only environment sessions' turns) ->
  rollout.prompts (the next turn) or rollout.trajectories (the finished session);
  ledger `envhub`.
- verifier: rollout.completions + rollout.trajectories (group verifier) -> rollout.rewards;
  ledger `verifier:<id>:<version>`.
- learner: rollout.completions + rollout.trajectories + rollout.rewards (group
  learner-<run>) -> rollout.policy; sets primerl:policy:<run>:version.
- archiver: reads every topic (group archiver; what it archives is config), no Redis.
- producer (`primerl publish`, replays): writes rollout.prompts only.
- operator (`primerl infra up`, `status`, `scale`, `tail`, the run observer of `primerl up`):
  creates topics, describes every group, reads every topic with throw-away groups,
  reads the registry and policy versions.
Every stage writes rollout.dlq.
"""

from __future__ import annotations

import msgspec

from schemas.topics import CHUNKS, COMPLETIONS, DEFERRED, DLQ, POLICY, PROMPTS, REWARDS, ROUTED, TOPICS, TRAJECTORIES

# Redis key prefixes (schemas/keys.py builds the keys).
REGISTRY = "primerl:registry:"
HELD = "primerl:kv:"
PENDING = "primerl:kvp:"
LOAD = "primerl:load:"
SESSIONS = "primerl:sessions:"
LEDGER = "primerl:ledger:"
POLICY_VERSION = "primerl:policy:"
RESUME = "primerl:resume:"


class Principal(msgspec.Struct, frozen=True):
    """What one kind of process may do. Groups ending in `-` are prefixes (learner-<run>)."""

    name: str
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    redis_read: tuple[str, ...] = ()
    redis_write: tuple[str, ...] = ()
    create_topics: bool = False
    describe_groups: bool = False


_ALL = tuple(TOPICS)

PRINCIPALS: tuple[Principal, ...] = (
    Principal(
        "primerl-router",
        reads=(PROMPTS.name,),
        writes=(ROUTED.name, DLQ.name),
        groups=("router",),
        redis_read=(REGISTRY, HELD),
        redis_write=(PENDING, LOAD, SESSIONS),
    ),
    Principal(
        "primerl-engine",
        reads=(ROUTED.name, DEFERRED.name, POLICY.name, PROMPTS.name, CHUNKS.name),
        writes=(CHUNKS.name, COMPLETIONS.name, DEFERRED.name, PROMPTS.name, ROUTED.name, DLQ.name),
        groups=("engine", "deferral", "router"),
        redis_write=(
            *(REGISTRY, HELD, PENDING, LOAD, SESSIONS, RESUME),
            *(LEDGER + "engine:", LEDGER + "policy-dead-letters:"),
        ),
    ),
    Principal(
        "primerl-envhub",
        reads=(COMPLETIONS.name,),
        writes=(PROMPTS.name, TRAJECTORIES.name, DLQ.name),
        groups=("envhub",),
        redis_write=(LEDGER + "envhub:",),
    ),
    Principal(
        "primerl-verifier",
        reads=(COMPLETIONS.name, TRAJECTORIES.name),
        writes=(REWARDS.name, DLQ.name),
        groups=("verifier",),
        redis_write=(LEDGER + "verifier:",),
    ),
    Principal(
        "primerl-learner",
        reads=(COMPLETIONS.name, TRAJECTORIES.name, REWARDS.name),
        writes=(POLICY.name, DLQ.name),
        groups=("learner-",),
        redis_write=(POLICY_VERSION,),
    ),
    Principal("primerl-archiver", reads=_ALL, writes=(DLQ.name,), groups=("archiver",)),
    Principal("primerl-producer", writes=(PROMPTS.name,)),
    Principal(
        "primerl-operator",
        reads=_ALL,
        groups=("observer-", "rewards-reader-", "dlq-reader-", "prompts-reader-", "tail-"),
        redis_read=(REGISTRY, POLICY_VERSION),
        create_topics=True,
        describe_groups=True,
    ),
)
