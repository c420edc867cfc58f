"""Group assembly and the staleness rule, in one pure class (no Kafka, no torch, no I/O).

A `GroupBuffer` joins each completion with its verified reward (by completion id, in
either order) into a `Sample`, collects a group's samples until the group is complete,
and hands complete groups out `n` at a time. It is the only place that

- turns a completion and its reward into a sample (`sample_of`),
- applies the staleness rule, `version - sample.policy_version > max_policy_lag`
  (`is_stale`), at join time and again at take time (a ready group can wait while
  other steps run),
- counts "consumed": every sample that leaves the buffer, trained or dropped, once.

Every operation returns the samples it dropped as `Drop`s (reason + completion ids),
so the learner's outcome log and metrics come from one place; nothing is raised for
bad data. Time is an argument (`now`, Unix seconds), never read here.

Drop reasons (the counters the buffer keeps in the `counters` it is given):

- `stale`: older than `max_policy_lag` versions at join or take time (counter `stale`, samples).
- `duplicate_in_group`: a second sample with the same `sample_index` of a group.
- `group_timeout`: a group incomplete after `group_timeout_s` with fewer than 2 samples
  (counter `groups_dropped`, groups; one with >= 2 becomes ready, counter `groups_partial`).
- `orphan_completion`: a completion whose reward did not come within `orphan_timeout_s`.
- `orphan_reward`: a verified reward whose completion did not come within `orphan_timeout_s`.
- `binding_mismatch`: a completion that the verified reward for its id does not bind:
  the reward's prompt_hash or tokens_hash is not the completion's, or its request or
  group id differs. The completion is rejected (`Drop.rejected` holds it, for the
  learner's dead letter) and the reward keeps waiting for the completion it scored.
  Completions are candidates: several with one id may wait (a forged one that came
  first, a regenerated one), and a reward joins the one it binds, whatever the order.
- `duplicate_completion`: a copy of a waiting candidate, or a candidate over
  `MAX_CANDIDATES` for one id (not consumed: it holds no sample).

"consumed" counts samples (completion ids) leaving the buffer: trained (taken), stale,
duplicate_in_group, group_timeout and orphan_completion. An orphan reward or a rejected
binding holds no sample of its own (its completion, if it ever comes, is counted when
it leaves), so they are not counted as consumed.

The whole state is `BufferState`, a msgspec struct the learner checkpoints inside
`LearnerState`: a restarted learner rebuilds the same buffer.
"""

from __future__ import annotations

import msgspec

from learners.samples import Sample
from plumbing.sessions import loss_mask, oldest_version
from plumbing.trust import prompt_hash, token_hash
from schemas import Completion, Reward

# Completions with one id waiting at once; more are dropped (bounds what a flood of
# same-id records, which only a holder of an engine key can sign, can make the buffer hold).
MAX_CANDIDATES = 4


class BufferState(msgspec.Struct):
    """What the buffer holds (checkpointed with the learner)."""

    completions: dict[str, list[Completion]] = {}  # candidates waiting for their reward, by id
    completion_seen: dict[str, float] = {}  # completion id -> when it arrived
    rewards: dict[str, Reward] = {}  # verified, waiting for their completion
    reward_seen: dict[str, float] = {}  # completion id -> when its reward arrived
    groups: dict[str, list[Sample]] = {}  # partial groups
    group_first_seen: dict[str, float] = {}
    ready: list[list[Sample]] = []  # complete (or timed-out with >= 2) groups, in the order they became ready


class Drop(msgspec.Struct, frozen=True):
    """Samples (completion ids) that left the buffer untrained, or a reward rejected, and why."""

    reason: str
    ids: list[str]
    detail: str = ""
    rejected: list[Completion] = []  # binding_mismatch: the completions refused (dead-lettered)


class Taken(msgspec.Struct, frozen=True):
    """What `take` handed out: the fresh groups to train on, and the stale ones it dropped."""

    groups: list[list[Sample]]
    drops: list[Drop]

    @property
    def ids(self) -> list[str]:
        """The completion ids of `groups`, in training order."""
        return [s.completion_id for g in self.groups for s in g]


def sample_of(c: Completion, r: Reward) -> Sample:
    """The sample of a completion scored by its reward (the one place a sample is made).

    A session's completion (the last turn of a trajectory, its layout checked by
    plumbing.sessions.check_layout before it got here) trains on the whole response after
    the first prompt: every turn's output and the tool responses between them, the latter
    masked out of the loss. Its version is the oldest of any turn (staleness stays conservative).
    """
    s = c.session
    if s is None:
        prompt, tokens, logprobs, mask, version = c.prompt_token_ids, c.token_ids, c.logprobs, [], c.policy_version
    else:
        prompt, tokens = c.prompt_token_ids[: s.prompt_len], c.prompt_token_ids[s.prompt_len :] + c.token_ids
        logprobs, mask, version = s.logprobs + c.logprobs, loss_mask(c), oldest_version(c)
    return Sample(
        completion_id=c.id,
        group_id=c.group_id,
        group_size=c.group_size,
        sample_index=c.sample_index,
        prompt_token_ids=prompt,
        token_ids=tokens,
        logprobs=logprobs,
        policy_version=version,
        reward=r.scalar,
        status=r.status,
        reward_id=r.id,
        loss_mask=mask,
    )


def binding_mismatch(c: Completion, r: Reward) -> str | None:
    """Why `r` cannot score `c`, or None: the reward's signed ids and hashes must be `c`'s
    (the tokens hash is what makes the tokens trained on the tokens the verifier scored)."""
    if r.completion_id != c.id:
        return f"reward for {r.completion_id!r}, completion {c.id!r}"
    if r.request_id != c.request_id:
        return f"reward request_id {r.request_id!r} != completion's {c.request_id!r}"
    if r.group_id != c.group_id:
        return f"reward group_id {r.group_id!r} != completion's {c.group_id!r}"
    if r.tokens_hash != token_hash(c.token_ids):
        return f"reward tokens_hash {r.tokens_hash[:12]}... is not the hash of the completion's token_ids"
    if r.prompt_hash != prompt_hash(c.prompt):
        return f"reward prompt_hash {r.prompt_hash[:12]}... is not the hash of the completion's prompt"
    return None


class GroupBuffer:
    """See the module doc. `counters` is bumped in place (the learner passes its durable ones)."""

    def __init__(
        self,
        *,
        max_policy_lag: int,
        group_timeout_s: float,
        orphan_timeout_s: float | None = None,
        state: BufferState | None = None,
        counters: dict[str, int] | None = None,
    ) -> None:
        self.max_policy_lag = max_policy_lag
        self.group_timeout_s = group_timeout_s
        self.orphan_timeout_s = group_timeout_s if orphan_timeout_s is None else orphan_timeout_s
        self.state = state if state is not None else BufferState()
        self.counters = counters if counters is not None else {}

    # ---- the rules, each in one place -------------------------------------------------

    def is_stale(self, policy_version: int, version: int) -> bool:
        """The staleness rule: a sample more than `max_policy_lag` versions behind `version`."""
        return version - policy_version > self.max_policy_lag

    def _count(self, name: str, n: int = 1) -> None:
        if n:
            self.counters[name] = self.counters.get(name, 0) + n

    def _consumed(self, n: int) -> None:
        """Samples leaving the buffer, trained or dropped: the only place "consumed" is counted."""
        self._count("consumed", n)

    # ---- what is in it -----------------------------------------------------------------

    @property
    def ready_groups(self) -> int:
        """Groups waiting for a step."""
        return len(self.state.ready)

    @property
    def partial_samples(self) -> int:
        """Samples in partial groups."""
        return sum(len(g) for g in self.state.groups.values())

    # ---- operations --------------------------------------------------------------------

    def restart_orphan_clocks(self, now: float) -> None:
        """Give every waiting completion and reward a full orphan timeout from `now`: after a
        restart their pairs may be among the records read again (a learner that was down
        longer than the timeout would otherwise drop them before reading those)."""
        s = self.state
        s.completion_seen = dict.fromkeys(s.completions, now)
        s.reward_seen = dict.fromkeys(s.rewards, now)

    def add_completion(self, c: Completion, now: float, version: int) -> list[Drop]:
        """Take in a completion as a candidate for its id (a verbatim copy of one waiting is dropped)."""
        s = self.state
        cands = s.completions.setdefault(c.id, [])
        if any(x == c for x in cands) or len(cands) >= MAX_CANDIDATES:
            self._count("duplicate_completion")
            why = (
                "a copy of a waiting completion" if any(x == c for x in cands) else f"over {MAX_CANDIDATES} candidates"
            )
            return [Drop("duplicate_completion", [c.id], why)]
        cands.append(c)
        s.completion_seen.setdefault(c.id, now)
        return self._join(c.id, now, version)

    def add_reward(self, r: Reward, now: float, version: int) -> list[Drop]:
        """Take in a verified reward (a later one for the same completion replaces one still waiting)."""
        s = self.state
        s.rewards[r.completion_id] = r
        s.reward_seen.setdefault(r.completion_id, now)
        return self._join(r.completion_id, now, version)

    def _join(self, completion_id: str, now: float, version: int) -> list[Drop]:
        s = self.state
        cands = s.completions.get(completion_id)
        r = s.rewards.get(completion_id)
        if not cands or r is None:
            return []
        # The reward is verified, so it says which completion was scored: candidates it does
        # not bind are refused; the reward waits on if the one it scored has not come yet.
        c: Completion | None = None
        drops: list[Drop] = []
        for x in cands:
            why = binding_mismatch(x, r)
            if why is None and c is None:
                c = x
            elif why is not None:
                self._count("rejected_binding_mismatch")
                drops.append(Drop("binding_mismatch", [completion_id], why, [x]))
        if c is None:
            del s.completions[completion_id], s.completion_seen[completion_id]
            return drops
        del s.completions[completion_id], s.completion_seen[completion_id]
        del s.rewards[completion_id], s.reward_seen[completion_id]
        sample = sample_of(c, r)
        if self.is_stale(sample.policy_version, version):
            self._count("stale")
            self._consumed(1)
            return [*drops, Drop("stale", [c.id], f"policy v{sample.policy_version}, learner v{version}")]
        group = s.groups.setdefault(c.group_id, [])
        s.group_first_seen.setdefault(c.group_id, now)
        if any(x.sample_index == c.sample_index for x in group):
            self._count("duplicate_in_group")
            self._consumed(1)
            return [*drops, Drop("duplicate_in_group", [c.id], f"sample {c.sample_index} of group {c.group_id}")]
        group.append(sample)
        if len(group) >= c.group_size:
            self._make_ready(c.group_id)
        return drops

    def _make_ready(self, group_id: str) -> None:
        s = self.state
        group = s.groups.pop(group_id)
        s.group_first_seen.pop(group_id, None)
        # In sample order, whatever order the samples joined in: a batch's contents and
        # order (and so its float sums) do not depend on how the topics interleaved.
        s.ready.append(sorted(group, key=lambda x: x.sample_index))

    def expire(self, now: float) -> list[Drop]:
        """Partial groups older than the group timeout (ready with >= 2 samples, else dropped),
        and completions or rewards that waited longer than the orphan timeout for their pair."""
        s = self.state
        drops: list[Drop] = []
        for gid, first in list(s.group_first_seen.items()):
            if now - first < self.group_timeout_s:
                continue
            group = s.groups.get(gid, [])
            if len(group) >= 2:
                self._make_ready(gid)
                self._count("groups_partial")
            else:
                s.groups.pop(gid, None)
                del s.group_first_seen[gid]
                self._count("groups_dropped")
                self._consumed(len(group))
                if group:
                    drops.append(Drop("group_timeout", [x.completion_id for x in group], f"group {gid}"))
        old = [cid for cid, t in s.completion_seen.items() if now - t >= self.orphan_timeout_s]
        for cid in old:
            del s.completions[cid], s.completion_seen[cid]
        if old:
            self._count("orphan_completion", len(old))
            self._consumed(len(old))
            drops.append(Drop("orphan_completion", old, "no verified reward"))
        old = [cid for cid, t in s.reward_seen.items() if now - t >= self.orphan_timeout_s]
        for cid in old:
            del s.rewards[cid], s.reward_seen[cid]
        if old:
            self._count("orphan_reward", len(old))
            drops.append(Drop("orphan_reward", old, "no completion"))
        return drops

    def take(self, n: int, version: int) -> Taken:
        """The first `n` ready groups (fewer if fewer are ready); a group with any sample
        stale under `version` is dropped whole. Every sample taken counts as consumed."""
        s = self.state
        groups, s.ready = s.ready[:n], s.ready[n:]
        fresh = [g for g in groups if not any(self.is_stale(x.policy_version, version) for x in g)]
        stale_ids = [x.completion_id for g in groups if not any(g is f for f in fresh) for x in g]
        self._consumed(sum(len(g) for g in groups))
        if stale_ids:
            self._count("stale", len(stale_ids))
            return Taken(fresh, [Drop("stale", stale_ids, f"at take, learner v{version}")])
        return Taken(fresh, [])
