"""What one engine holds, rebuilt from vLLM's own KV-cache events.

vLLM reports blocks by its internal hash; each stored block also carries its token
ids and its parent, so the tracker re-derives our chained hash (block_hashes.py) for
it and keeps vLLM's hash -> ours for the removals. Changes are queued for the Redis
index (index.py) and the whole set can be re-sent after an outage.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from plumbing.prefix_cache.block_hashes import next_hash, policy_salt, root_hash

log = logging.getLogger(__name__)


@dataclass
class HeldBlocks:
    """Our hashes of the blocks one engine holds, plus the changes not yet indexed."""

    policy_version: int = 0
    by_vllm: dict[Any, str] = field(default_factory=dict)
    added: set[str] = field(default_factory=set)
    removed: set[str] = field(default_factory=set)
    cleared: bool = False
    orphans: int = 0  # stored blocks whose parent we never saw (events dropped)

    def held(self) -> set[str]:
        """Every block hash held now."""
        return set(self.by_vllm.values())

    def stored(
        self, vllm_hashes: list[Any], parent: Any, token_ids: list[int], block_size: int, salt: str | None
    ) -> None:
        """Blocks vLLM just cached, in chain order after `parent` (None: the prompt's start)."""
        if parent is None:
            ours = root_hash(salt or policy_salt(self.policy_version))
        elif parent in self.by_vllm:
            ours = self.by_vllm[parent]
        else:
            self.orphans += 1
            return
        for i, vh in enumerate(vllm_hashes):
            ours = next_hash(ours, token_ids[i * block_size : (i + 1) * block_size])
            self.by_vllm[vh] = ours
            self.added.add(ours)
            self.removed.discard(ours)

    def evicted(self, vllm_hashes: Iterable[Any]) -> None:
        """Blocks vLLM dropped from its cache."""
        for vh in vllm_hashes:
            ours = self.by_vllm.pop(vh, None)
            if ours is not None:
                self.removed.add(ours)
                self.added.discard(ours)

    def all_cleared(self) -> None:
        """vLLM emptied its cache (a weight reload resets the prefix cache)."""
        self.by_vllm.clear()
        self.added.clear()
        self.removed.clear()
        self.cleared = True

    def take_changes(self) -> tuple[bool, set[str], set[str]]:
        """(cleared, added, removed) since the last call; the caller indexes them."""
        out = (self.cleared, self.added, self.removed)
        self.cleared, self.added, self.removed = False, set(), set()
        return out

    def apply(self, event: Any) -> None:
        """Apply one vLLM KV event (BlockStored, BlockRemoved or AllBlocksCleared)."""
        kind = type(event).__name__
        if kind == "BlockStored":
            self.stored(
                list(event.block_hashes),
                event.parent_block_hash,
                list(event.token_ids),
                int(event.block_size),
                _salt_of(event),
            )
        elif kind == "BlockRemoved":
            self.evicted(event.block_hashes)
        elif kind == "AllBlocksCleared":
            self.all_cleared()


def _salt_of(event: Any) -> str | None:
    """The cache salt of a chain's first block, from the event's extra keys."""
    for keys in event.extra_keys or ():
        for key in keys or ():
            if isinstance(key, str) and key.startswith("policy-v"):
                return key
    return None
