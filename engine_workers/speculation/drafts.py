"""Model-free drafts: grammar-forced tokens and n-gram continuations from related text."""

from __future__ import annotations

from array import array
from typing import Any

import numpy as np
from collections import OrderedDict, deque
from collections.abc import Sequence


def ngram_draft(context: Sequence[int], sources: list[Sequence[int]], k: int, n_max: int = 4, n_min: int = 2) -> list[int]:
    """Up to `k` tokens that followed the longest recent n-gram of `context` in `sources`.

    Sources are searched in order (put the most related first); the first match of the
    longest n wins.
    """
    if k <= 0 or len(context) < n_min:
        return []
    packed = [array("i", s).tobytes() for s in sources]
    for n in range(min(n_max, len(context)), n_min - 1, -1):
        pattern = array("i", context[-n:]).tobytes()
        for src_bytes, src in zip(packed, sources, strict=True):
            start = src_bytes.rfind(pattern)
            while start >= 0 and start % 4:
                start = src_bytes.rfind(pattern, 0, start + len(pattern) - 1)
            if start < 0:
                continue
            after = start // 4 + n
            if after < len(src):
                return list(src[after : after + k])
    return []


class RoundsCache:
    """Outputs of finished samples per prompt (siblings and earlier rounds), bounded."""

    def __init__(self, prompts: int = 512, per_prompt: int = 16) -> None:
        self._by_prompt: OrderedDict[int, deque[list[int]]] = OrderedDict()
        self._prompts = prompts
        self._per_prompt = per_prompt

    def add(self, prompt_key: int, output: list[int]) -> None:
        """Remember a finished sample of a prompt."""
        outs = self._by_prompt.pop(prompt_key, None) or deque(maxlen=self._per_prompt)
        outs.append(output)
        self._by_prompt[prompt_key] = outs
        while len(self._by_prompt) > self._prompts:
            self._by_prompt.popitem(last=False)

    def get(self, prompt_key: int) -> list[list[int]]:
        """Finished outputs of the prompt, newest first."""
        return list(reversed(self._by_prompt.get(prompt_key, ())))


def forced_tokens(matcher: Any, bitmask: Any, k: int) -> list[int]:
    """The next tokens the grammar allows exactly one of, up to `k` (the matcher is left as found).

    Exact at the token level, unlike the jump-forward string, whose tokenisation may
    differ from the model's: a token that is the mask's only choice is always accepted.
    """
    forced: list[int] = []
    for _ in range(k):
        if matcher.is_terminated():
            break
        matcher.fill_next_token_bitmask(bitmask, 0)
        words = bitmask[0].numpy().view(np.uint32)
        nonzero = np.flatnonzero(words)
        if len(nonzero) != 1:
            break
        word = int(words[nonzero[0]])
        if word & (word - 1):  # two or more tokens allowed
            break
        token = int(nonzero[0]) * 32 + word.bit_length() - 1
        if not matcher.accept_token(token):
            break
        forced.append(token)
    if forced:
        matcher.rollback(len(forced))
    return forced
