"""perf/session_split_sim.py: the cost model's myopic split of an opening burst, on fixed orders."""

from __future__ import annotations

import random

from perf.session_split_sim import burst, partition_order, split


def test_the_burst_is_four_session_turns_and_two_groups_of_eight() -> None:
    b = burst()
    assert len(b) == 20 and sorted({k for k, _, _ in b}) == ["g0", "g1", "s0", "s1", "s2", "s3"]


def test_by_cost_alone_sessions_split_evenly_in_publish_order_but_not_when_groups_interleave() -> None:
    b = burst()
    sessions, groups = b[:4], b[4:]
    assert split(sessions + groups, 0.5, balance_sessions=False) == (2, 2)
    assert split(groups + sessions, 0.5, balance_sessions=False) == (2, 2)
    # s0, then group 0's first sample, s1, group 1's first: both groups end on one worker and
    # every session on the other (the instantaneous load is balanced; the sessions' later turns are not).
    interleaved = [sessions[0], groups[0], sessions[1], groups[8], *sessions[2:], *groups[1:8], *groups[9:]]
    assert split(interleaved, 0.5, balance_sessions=False) == (4, 0)
    assert split(interleaved, 0.5) == (2, 2)


def test_balancing_live_sessions_splits_them_evenly_in_every_order() -> None:
    rng = random.Random(7)
    for _ in range(200):
        shuffled = burst()
        rng.shuffle(shuffled)
        assert split(shuffled, 0.5) == (2, 2)
        assert split(partition_order(burst(), rng), 0.5) == (2, 2)


def test_the_partition_order_keeps_a_keys_records_together_in_publish_order() -> None:
    order = partition_order(burst(), random.Random(3))
    keys = [k for k, _, _ in order]
    runs = [k for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k]
    assert sorted(keys) == sorted(k for k, _, _ in burst())
    assert len(runs) == len(set(runs)) == 6  # every key's records in one contiguous run
