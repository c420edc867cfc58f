"""Which worker should serve a request: the lowest estimated time to first token.

All terms are in prefill-token units (the engines are alike, so one rate converts
them to seconds for all):

    cost(w) = queued prefill(w) + decode_token_cost * queued decode(w) + uncached prompt(w)

Queued prefill is what delays a new request's first token; queued decode slows each
step but is interleaved with the new prefill, hence its smaller weight. A hot prefix
whose home is overloaded goes elsewhere as soon as recomputing it there is cheaper
than waiting, which replicates it; affinity never makes a hot spot.
"""

from __future__ import annotations

import msgspec

from engine_workers.prefix_cache.block_hashes import cacheable_tokens
from engine_workers.prefix_cache.index import Probe


class Choice(msgspec.Struct, frozen=True):
    """A routing decision: the worker, what it should find cached, what the request adds."""

    probe: Probe
    predicted_cached_tokens: int
    cost: float
    prefill_tokens: float
    decode_tokens: float


def choose(probes: list[Probe], prompt_len: int, block_size: int, decode_tokens: float, decode_token_cost: float) -> Choice:
    """The cheapest worker for a request of `prompt_len` prompt tokens; ties go to the least loaded."""
    if not probes:
        raise ValueError("no worker to choose from")
    best: Choice | None = None
    best_key: tuple[float, float] = (0.0, 0.0)
    for p in probes:
        cached = cacheable_tokens(p.matched_blocks, prompt_len, block_size)
        queued = p.prefill_load + decode_token_cost * p.decode_load
        uncached = prompt_len - cached
        cost = queued + uncached
        key = (cost, queued)
        if best is None or key < best_key:
            best, best_key = Choice(p, cached, cost, float(uncached), decode_tokens), key
    assert best is not None
    return best
