"""The GroupBuffer without Kafka: joins in either order, duplicates, binding checks,
staleness at join and at take, expiry of partial groups and of orphans, and the
"consumed" count (once per sample that leaves)."""

from __future__ import annotations

import msgspec

from learners.group_buffer import BufferState, GroupBuffer
from learners.state import LearnerState, decode_state
from plumbing.trust import prompt_hash, token_hash
from schemas import Completion, Reward, RewardStatus
from tests.reward_helpers import make_completion


def _c(group: str, i: int, n: int = 2, version: int = 0, cid: str | None = None) -> Completion:
    return msgspec.structs.replace(
        make_completion("x"),
        id=cid or f"{group}/{i}",
        request_id=f"req-{group}",
        group_id=group,
        group_size=n,
        sample_index=i,
        policy_version=version,
    )


def _r(c: Completion, scalar: float = 1.0, **over: str) -> Reward:
    fields = {
        "request_id": c.request_id,
        "group_id": c.group_id,
        "prompt_hash": prompt_hash(c.prompt),
        "tokens_hash": token_hash(c.token_ids),
        **over,
    }
    return Reward(
        run_id=c.run_id,
        completion_id=c.id,
        policy_version=c.policy_version,
        verifier_id="v",
        verifier_version="1",
        components={},
        scalar=scalar,
        status=RewardStatus.OK,
        **fields,
    )


def _buf(lag: int = 1, timeout: float = 10.0) -> GroupBuffer:
    return GroupBuffer(max_policy_lag=lag, group_timeout_s=timeout)


def test_joins_in_either_order_and_a_group_becomes_ready_in_sample_order() -> None:
    b = _buf()
    c0, c1 = _c("g", 0), _c("g", 1)
    assert b.add_reward(_r(c1, 0.0), 0.0, 0) == []  # reward first
    assert b.add_completion(c1, 1.0, 0) == []
    assert b.partial_samples == 1 and b.ready_groups == 0
    assert b.add_completion(c0, 2.0, 0) == [] and b.add_reward(_r(c0), 3.0, 0) == []  # completion first
    assert b.ready_groups == 1 and not b.state.completions and not b.state.rewards and not b.state.groups
    taken = b.take(4, 0)
    assert taken.ids == ["g/0", "g/1"] and taken.drops == [] and [s.reward for s in taken.groups[0]] == [1.0, 0.0]
    assert taken.groups[0][0].reward_id and b.counters == {"consumed": 2}


def test_duplicates() -> None:
    b = _buf()
    c0 = _c("g", 0, n=3)
    b.add_completion(c0, 0.0, 0)
    [drop] = b.add_completion(c0, 0.2, 0)  # a verbatim copy while waiting: dropped, not consumed
    assert drop.reason == "duplicate_completion"
    other = msgspec.structs.replace(c0, token_ids=[9])
    assert b.add_completion(other, 0.5, 0) == []  # another candidate with that id: both wait
    assert [x.token_ids for x in b.state.completions["g/0"]] == [c0.token_ids, [9]]
    [drop] = b.add_reward(_r(c0), 1.0, 0)  # binds c0; the other candidate is refused
    assert drop.reason == "binding_mismatch" and drop.rejected == [other] and "tokens_hash" in drop.detail
    # Another completion with the same sample index of the same group: dropped, consumed.
    dup = _c("g", 0, n=3, cid="g/0-regenerated")
    b.add_completion(dup, 2.0, 0)
    [drop] = b.add_reward(_r(dup), 2.0, 0)
    assert drop.reason == "duplicate_in_group" and drop.ids == ["g/0-regenerated"]
    assert b.partial_samples == 1
    assert b.counters == {
        "duplicate_completion": 1,
        "rejected_binding_mismatch": 1,
        "duplicate_in_group": 1,
        "consumed": 1,
    }


def test_a_completion_its_reward_does_not_bind_is_refused_and_the_reward_waits() -> None:
    b = _buf()
    c0, c1 = _c("g", 0), _c("g", 1)
    b.add_completion(msgspec.structs.replace(c0, group_id="other"), 0.0, 0)
    [drop] = b.add_reward(_r(c0), 1.0, 0)
    assert drop.reason == "binding_mismatch" and drop.ids == ["g/0"] and "group_id" in drop.detail
    b.add_reward(_r(c1), 1.0, 0)  # reward first: checked when a completion comes
    [drop] = b.add_completion(msgspec.structs.replace(c1, request_id="req-other"), 2.0, 0)
    assert drop.reason == "binding_mismatch" and "request_id" in drop.detail and len(drop.rejected) == 1
    [drop] = b.add_completion(msgspec.structs.replace(c1, prompt="another prompt"), 2.0, 0)
    assert "prompt_hash" in drop.detail
    assert not b.state.completions and set(b.state.rewards) == {"g/0", "g/1"}
    assert b.counters == {"rejected_binding_mismatch": 3}  # nothing left the buffer as a sample
    assert b.add_completion(c0, 3.0, 0) == [] and b.add_completion(c1, 3.0, 0) == []
    assert b.ready_groups == 1


def test_a_forged_completion_that_comes_first_is_never_trained_and_the_genuine_one_joins() -> None:
    for reward_first in (False, True):
        b = _buf()
        genuine = _c("g", 0, n=1)
        forged = msgspec.structs.replace(genuine, token_ids=[6, 6, 6], text="forged")
        drops = b.add_reward(_r(genuine), 0.0, 0) if reward_first else []
        drops += b.add_completion(forged, 0.5, 0)
        drops += b.add_completion(genuine, 1.0, 0)
        if not reward_first:
            drops += b.add_reward(_r(genuine), 1.5, 0)
        assert [(d.reason, d.rejected) for d in drops] == [("binding_mismatch", [forged])]
        [group] = b.take(1, 0).groups
        assert [s.token_ids for s in group] == [genuine.token_ids]


def test_staleness_at_join_and_at_take() -> None:
    b = _buf(lag=1)
    old = _c("old", 0, n=2, version=1)
    b.add_completion(old, 0.0, 3)
    [drop] = b.add_reward(_r(old), 0.0, 3)  # 3 - 1 > 1
    assert drop.reason == "stale" and drop.ids == ["old/0"]
    ok = [_c("a", i, version=2) for i in range(2)] + [_c("b", i, version=3) for i in range(2)]
    for c in ok:
        assert b.add_completion(c, 0.0, 3) == [] and b.add_reward(_r(c), 0.0, 3) == []  # lag 1 and 0: fresh
    assert b.ready_groups == 2
    taken = b.take(2, 4)  # the policy moved on while they waited: group a (v2) is stale now, b (v3) is not
    assert [g[0].group_id for g in taken.groups] == ["b"]
    assert [(d.reason, d.ids) for d in taken.drops] == [("stale", ["a/0", "a/1"])]
    assert b.counters == {"stale": 3, "consumed": 5}


def test_partial_groups_expire_ready_with_two_samples_else_dropped() -> None:
    b = _buf(timeout=10.0)
    for c in [_c("two", 0, n=4), _c("two", 2, n=4), _c("one", 0, n=4)]:
        b.add_completion(c, 0.0, 0)
        b.add_reward(_r(c), 0.0, 0)
    assert b.expire(9.9) == []
    [drop] = b.expire(10.0)
    assert drop.reason == "group_timeout" and drop.ids == ["one/0"]
    assert b.ready_groups == 1 and [s.sample_index for s in b.state.ready[0]] == [0, 2] and not b.state.group_first_seen
    assert b.counters == {"groups_partial": 1, "groups_dropped": 1, "consumed": 1}
    b.take(1, 0)
    assert b.counters["consumed"] == 3


def test_a_completion_or_reward_waiting_longer_than_the_timeout_is_dropped() -> None:
    b = _buf(timeout=10.0)
    lonely, late = _c("g", 0), _c("h", 0)
    b.add_completion(lonely, 0.0, 0)
    b.add_reward(_r(late), 5.0, 0)
    assert b.expire(9.0) == []
    [drop] = b.expire(10.0)
    assert (drop.reason, drop.ids) == ("orphan_completion", ["g/0"])
    [drop] = b.expire(15.0)
    assert (drop.reason, drop.ids) == ("orphan_reward", ["h/0"])
    assert not b.state.completions and not b.state.rewards and not b.state.completion_seen and not b.state.reward_seen
    # Only the completion was a sample leaving the buffer; its reward-less pair is counted when it goes.
    assert b.counters == {"orphan_completion": 1, "orphan_reward": 1, "consumed": 1}
    # The completion arriving after its reward was dropped waits again, then goes too: counted once.
    b.add_completion(late, 16.0, 0)
    assert b.expire(30.0)[0].reason == "orphan_completion" and b.counters["consumed"] == 2


def test_restart_gives_waiting_items_a_full_timeout() -> None:
    b = _buf(timeout=10.0)
    b.add_completion(_c("g", 0), 0.0, 0)
    b.restart_orphan_clocks(100.0)
    assert b.expire(105.0) == [] and b.expire(110.0)[0].reason == "orphan_completion"


def test_consumed_is_counted_once_per_sample_over_a_mixed_history() -> None:
    b = _buf(lag=0, timeout=10.0)
    left: set[str] = set()
    cs = (
        [_c("a", i) for i in range(2)]
        + [_c("s", 0, version=0)]
        + [_c("p", 0, n=3)]
        + [_c("q", i, n=3) for i in range(2)]
    )
    for c in cs:
        b.add_completion(c, 0.0, 0)
    for c in cs[:2]:
        b.add_reward(_r(c), 0.0, 0)
    for d in b.add_reward(_r(cs[2]), 0.0, 1):  # joins at v1: stale
        left.update(d.ids)
    for c in cs[3:]:
        assert b.add_reward(_r(c), 0.0, 0) == []
    for d in b.expire(20.0):
        left.update(d.ids)
    taken = b.take(10, 0)
    left.update(taken.ids)
    for d in taken.drops:
        left.update(d.ids)
    assert left == {c.id for c in cs} and b.counters["consumed"] == len(cs)


def test_the_buffer_is_checkpointed_inside_the_learner_state_and_old_checkpoints_load() -> None:
    b = _buf()
    state = LearnerState(run_id="r", buffer=b.state)
    c0, c1 = _c("g", 0, n=3), _c("g", 1, n=3)
    b.add_completion(c0, 1.0, 0)
    b.add_reward(_r(c0), 1.0, 0)
    b.add_completion(c1, 2.0, 0)
    back = decode_state(msgspec.msgpack.encode(state))
    assert back.buffer == b.state and set(back.buffer.completions) == {"g/1"}
    one_per_id = msgspec.msgpack.decode(msgspec.msgpack.encode(state))
    one_per_id["buffer"]["completions"] = {"g/1": msgspec.msgpack.decode(msgspec.msgpack.encode(c1))}
    assert decode_state(msgspec.msgpack.encode(one_per_id)).buffer == b.state
    legacy = {
        "run_id": "r",
        "step": 3,
        "completions": {"g/1": msgspec.msgpack.decode(msgspec.msgpack.encode(c1))},
        "rewards": {},
        "groups": msgspec.to_builtins(b.state.groups),
        "group_first_seen": {"g": 1.0},
        "ready": [],
    }
    old = decode_state(msgspec.msgpack.encode(legacy))
    assert old.step == 3 and set(old.buffer.completions) == {"g/1"} and old.buffer.groups == b.state.groups
    assert isinstance(old.buffer, BufferState) and old.buffer.completion_seen == {}
