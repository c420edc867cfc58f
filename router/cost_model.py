"""Which worker should serve a request: time to first token, weighed against work.

All terms are in prefill-token units (the engines are alike, so one rate converts
them to seconds for all):

    queued(w) = queued prefill(w) + decode_token_cost * queued decode(w)
    ttft(w)   = queued(w) + uncached prompt(w)          (the request's own latency)
    work(w)   = uncached prompt(w)                      (what it adds to the fleet)
    cost(w)   = latency_weight * ttft(w) + (1 - latency_weight) * work(w)
              = latency_weight * queued(w) + uncached(w)

Queued prefill is what delays a first token; queued decode slows each step but is
interleaved with a new prefill, hence its weight. Pure TTFT (latency_weight 1)
scatters a burst of a group's samples: the second sample's fastest start is to
recompute the prefix on an idle worker while the first still prefills it, so every
worker ends up computing every prefix. Pure affinity (0) makes hot spots. In between,
a hot prefix whose home is overloaded still moves as soon as the wait there outweighs
recomputing it elsewhere, which replicates it.

A session's first turn is placed by live sessions before cost: a group is one-shot work,
but a session's later turns stay where its first turn went (its own prefix is cached
there, and moving costs a re-prefill of its whole context, which the cost rightly
refuses turn by turn). Balancing only the queue at the moment of the opening burst put
3 or 4 of the bench's 4 sessions on one of 2 engines in 41 % of decision orders
(perf/session_split_sim.py) and 2 of 3 prime repeats, which then idled the other engine
for most of the cell (54-55 s walls against 47-50 s balanced). Fewest live sessions
first costs at most one prefill of a shared system prompt per worker.
"""

from __future__ import annotations

import hashlib

import msgspec

from plumbing.prefix_cache.block_hashes import cacheable_tokens
from plumbing.prefix_cache.index import Probe


class Choice(msgspec.Struct, frozen=True):
    """A routing decision: the worker, what it should find cached, what the request adds."""

    probe: Probe
    predicted_cached_tokens: int
    cost: float
    prefill_tokens: float
    decode_tokens: float


def choose(
    probes: list[Probe],
    prompt_len: int,
    block_size: int,
    decode_tokens: float,
    decode_token_cost: float,
    latency_weight: float = 0.5,
    tie_key: bytes | None = None,
    new_session: bool = False,
) -> Choice:
    """The cheapest worker for a request of `prompt_len` prompt tokens; ties go to the least
    loaded, then (with `tie_key`, the request's routing key) to its rendezvous-hash favourite.

    Why the hash: prompts shorter than one KV block (the CPU default is 128 tokens) match
    nothing, so an idle fleet ties on every request; breaking ties by list order (workers
    sorted by id) sent every such request to the same worker while the others idled, which
    is what a 1 -> 2 engines scale-up under a light load saw. The hash spreads the keys of a
    tie evenly and keeps a key on one worker while the fleet is unchanged.

    `new_session`: the request opens a session, so it goes to a worker with the fewest live
    sessions first (see the module doc), and by cost among those."""
    if not probes:
        raise ValueError("no worker to choose from")
    best: Choice | None = None
    best_key: tuple[int, float, float, int] = (0, 0.0, 0.0, 0)
    for p in probes:
        cached = cacheable_tokens(p.matched_blocks, prompt_len, block_size)
        queued = p.prefill_load + decode_token_cost * p.decode_load
        uncached = prompt_len - cached
        cost = latency_weight * queued + uncached
        tie = _rendezvous(tie_key, p.worker.worker_id) if tie_key is not None else 0
        key = (p.live_sessions if new_session else 0, cost, queued, tie)
        if best is None or key < best_key:
            best, best_key = Choice(p, cached, cost, float(uncached), decode_tokens), key
    assert best is not None
    return best


def _rendezvous(key: bytes, worker_id: str) -> int:
    """A well-mixed hash of (key, worker): crc32 is linear, so worker ids that differ in one
    character ranked the same way for most keys (one worker of three got none in a test)."""
    return int.from_bytes(hashlib.blake2b(key + b"\0" + worker_id.encode(), digest_size=8).digest(), "big")
