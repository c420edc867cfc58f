"""Model-free drafts: grammar-forced tokens and n-gram continuations voted on by related text.

A draft token carries the probability that it is accepted together with every draft
token before it. The scheduler drafts a token only while that probability beats the
break-even acceptance of verifying it (step_cost.py).
"""

from __future__ import annotations

from array import array
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

FORCED = "forced"
NGRAM = "ngram"


class DraftToken(NamedTuple):
    """One proposed token, where it came from and P(it and all before it are accepted)."""

    token: int
    source: str
    prob: float


def continuations(
    context: Sequence[int], sources: Sequence[Sequence[int]], n_max: int = 4, n_min: int = 2, limit: int = 64
) -> list[tuple[Sequence[int], int]]:
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


# A forced text is drafted in the tokenizer's own (canonical) split of it, which is how
# the model mostly writes it. Its last token is the exception: where free text follows,
# the model often splits there differently (`":` then `"Bob` rather than `":"` then
# `Bob`; a trailing space glued to the next word), so it is a coin flip; a text of one
# token has no such boundary inside it.
FORCED_PROB = 0.95
LAST_TOKEN_PROB = 0.5


def forced_tokens(
    matcher: Any, encode: Callable[[str], Sequence[int]], learned: Callable[[int, float], float] | None = None
) -> list[tuple[int, float]]:
    """The text the grammar forces from here on (its jump-forward string), as tokens, each
    with the probability that the model writes it: the prior above, or what `learned`
    makes of it (token, prior) from how often the model wrote that token before."""
    text = matcher.find_jump_forward_string()
    if not text:
        return []
    ids = encode(text)
    priors = [LAST_TOKEN_PROB if i == len(ids) - 1 and i else FORCED_PROB for i in range(len(ids))]
    return [(t, learned(t, p) if learned else p) for t, p in zip(ids, priors, strict=True)]


def propose(
    context: Sequence[int],
    sources: Sequence[Sequence[int]],
    k: int,
    min_prob: float,
    *,
    matcher: Any = None,
    encode: Callable[[str], Sequence[int]] | None = None,
    forced: bool = True,
    ngram: bool = True,
    learned: Callable[[int, float], float] | None = None,
) -> list[DraftToken]:
    """Up to `k` draft tokens for a request whose tokens so far are `context`.

    Where the grammar forces the next characters, their tokens (`forced_tokens`, needs
    `encode`; `learned` goes to it); otherwise the continuation most of the matching
    n-grams in `sources` agree on, among those the grammar accepts, with probability
    votes / (valid votes + 1), so one lone match counts as a coin flip. Every draft token is one the grammar
    accepts; drafting stops where the running probability falls below `min_prob`. The
    matcher is left as found.
    """
    context = list(context)
    out: list[DraftToken] = []
    pushed = 0  # tokens pushed into the matcher, rolled back at the end
    prob = 1.0
    cands: list[tuple[Sequence[int], int]] | None = None
    token: int | None  # a forced run's token, or the n-gram vote's winner (None: no valid continuation)

    def push(token: int) -> bool:
        nonlocal pushed
        if matcher is None:
            return True
        if not matcher.accept_token(token):
            return False
        pushed += 1
        return True

    try:
        while len(out) < k and not (matcher is not None and matcher.is_terminated()):
            run = (
                forced_tokens(matcher, encode, learned) if forced and matcher is not None and encode is not None else []
            )
            if run:
                for token, p in run[: k - len(out)]:
                    if prob * p < min_prob or not push(token):
                        return out
                    prob *= p
                    out.append(DraftToken(token, FORCED, prob))
                cands = None  # the context moved on by a run no n-gram match predicted
                continue
            if not ngram:
                break
            if not cands:
                cands = continuations(context + [t.token for t in out], sources)
            votes = Counter(src[j] for src, j in cands if j < len(src))
            total, token, p = sum(votes.values()), None, 0.0
            for tok, count in votes.most_common():
                if push(tok):
                    token, p = tok, count / (total + 1)
                    break
                total -= count  # the grammar rules it out: not a real alternative
            if token is None or prob * p < min_prob:
                break  # (a pushed but undrafted token is rolled back with the rest)
            prob *= p
            out.append(DraftToken(token, NGRAM, prob))
            cands = [(src, j + 1) for src, j in cands if j < len(src) and src[j] == token]
    finally:
        if pushed:
            matcher.rollback(pushed)
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
