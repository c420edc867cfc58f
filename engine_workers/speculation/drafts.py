"""Model-free drafts: grammar-forced tokens and n-gram continuations voted on by related text.

A draft token carries the probability that it is accepted together with every draft
token before it. The scheduler drafts a token only while that probability beats the
break-even acceptance of verifying it (step_cost.py).
"""

from __future__ import annotations

from array import array
from collections import Counter, OrderedDict, deque
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import numpy as np

FORCED = "forced"
NGRAM = "ngram"


class DraftToken(NamedTuple):
    """One proposed token, where it came from and P(it and all before it are accepted)."""

    token: int
    source: str
    prob: float


def continuations(context: Sequence[int], sources: Sequence[Sequence[int]], n_max: int = 4, n_min: int = 2,
                  limit: int = 64) -> list[tuple[Sequence[int], int]]:
    """Where the longest recent n-gram of `context` occurs in `sources`: (source, index after it).

    Only the longest n (from n_max down to n_min) that occurs anywhere counts; matches
    are token-aligned, newest first in each source, at most `limit` in all.
    """
    for n in range(min(n_max, len(context)), n_min - 1, -1):
        pattern = array("i", context[-n:]).tobytes()
        found: list[tuple[Sequence[int], int]] = []
        for src in sources:
            data = array("i", src).tobytes()
            end = len(data)
            while len(found) < limit:
                start = data.rfind(pattern, 0, end)
                if start < 0:
                    break
                end = start + len(pattern) - 1  # the next search must start before this match
                if start % 4 == 0 and start // 4 + n < len(src):
                    found.append((src, start // 4 + n))
        if found:
            return found
    return []


def _forced_token(matcher: Any, bitmask: Any) -> int | None:
    """The only token the grammar allows next, if exactly one is allowed."""
    # Two possible next characters mean two possible (byte-level) tokens: skip the
    # full-vocabulary mask unless the next characters are determined.
    if not matcher.find_jump_forward_string():
        return None
    matcher.fill_next_token_bitmask(bitmask, 0)
    words = bitmask[0].numpy().view(np.uint32)
    nonzero = np.flatnonzero(words)
    if len(nonzero) != 1:
        return None
    word = int(words[nonzero[0]])
    if word & (word - 1):  # two or more tokens allowed
        return None
    return int(nonzero[0]) * 32 + word.bit_length() - 1


def propose(context: Sequence[int], sources: Sequence[Sequence[int]], k: int, min_prob: float, *,
            matcher: Any = None, bitmask: Any = None, forced: bool = True, ngram: bool = True) -> list[DraftToken]:
    """Up to `k` draft tokens for a request whose tokens so far are `context`.

    Per position: the grammar's only allowed token if there is one (probability 1;
    exact at the token level, unlike a jump-forward string, whose tokenisation may
    differ from the model's); otherwise the continuation most of the matching
    n-grams in `sources` agree on, among those the grammar accepts, with probability
    votes / (valid votes + 1), so one lone match counts as a coin flip. Drafting
    stops where the running probability falls below `min_prob`. The matcher is
    left as found.
    """
    context = list(context)
    out: list[DraftToken] = []
    accepted = 0  # tokens pushed into the matcher, rolled back at the end
    prob = 1.0
    cands: list[tuple[Sequence[int], int]] | None = None
    try:
        while len(out) < k:
            if matcher is not None and matcher.is_terminated():
                break
            only = _forced_token(matcher, bitmask) if forced and matcher is not None else None
            if only is not None:
                if not matcher.accept_token(only):
                    break
                accepted += 1
                token, source, p = only, FORCED, 1.0
            else:
                if not ngram:
                    break
                if not cands:
                    cands = continuations(context + [t.token for t in out], sources)
                votes = Counter(src[j] for src, j in cands if j < len(src))
                total, token = sum(votes.values()), None
                for tok, count in votes.most_common():
                    if matcher is None or matcher.accept_token(tok):
                        accepted += matcher is not None
                        token, p = tok, count / (total + 1)
                        break
                    total -= count  # the grammar rules it out: not a real alternative
                if token is None or prob * p < min_prob:
                    break
                source = NGRAM
            prob *= p
            out.append(DraftToken(token, source, prob))
            cands = [(src, j + 1) for src, j in cands or () if j < len(src) and src[j] == token]
    finally:
        if accepted:
            matcher.rollback(accepted)
    return out


class OutputsCache:
    """Recent finished outputs per key (a prompt, or a grammar), bounded, newest first."""

    def __init__(self, keys: int = 512, per_key: int = 16) -> None:
        self._by_key: OrderedDict[Hashable, deque[list[int]]] = OrderedDict()
        self._keys = keys
        self._per_key = per_key

    def add(self, key: Hashable, output: list[int]) -> None:
        """Remember a finished output under `key`."""
        outs = self._by_key.pop(key, None) or deque(maxlen=self._per_key)
        outs.append(output)
        self._by_key[key] = outs
        while len(self._by_key) > self._keys:
            self._by_key.popitem(last=False)

    def get(self, key: Hashable) -> list[list[int]]:
        """Finished outputs under `key`, newest first."""
        return list(reversed(self._by_key.get(key, ())))
