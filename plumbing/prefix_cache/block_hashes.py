"""Block hashes chained over token ids: the keys of the global prefix index.

The same function runs in the router (over a request's prompt) and in the worker
(over the blocks vLLM reports stored), so both sides agree without sharing vLLM's
internal hash. Only full blocks are hashed, as vLLM caches only full blocks. The salt
(the policy version) seeds the chain: KV of one policy never matches another's.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence


def root_hash(salt: str) -> str:
    """The parent of a chain's first block."""
    return hashlib.blake2b(salt.encode(), digest_size=8).hexdigest()


def next_hash(parent: str, block_tokens: Sequence[int]) -> str:
    """The hash of one block given its parent's hash."""
    h = hashlib.blake2b(bytes.fromhex(parent), digest_size=8)
    h.update(struct.pack(f"<{len(block_tokens)}I", *block_tokens))
    return h.hexdigest()


def chain_hashes(token_ids: Sequence[int], block_size: int, salt: str) -> list[str]:
    """Hashes of every full block of `token_ids`, each chained to the one before."""
    parent = root_hash(salt)
    out = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = next_hash(parent, token_ids[start : start + block_size])
        out.append(parent)
    return out


def policy_salt(version: int) -> str:
    """The cache salt of a policy version (also vLLM's `cache_salt`, see engine.py)."""
    return f"policy-v{version}"


def cacheable_tokens(matched_blocks: int, prompt_len: int, block_size: int) -> int:
    """Prompt tokens vLLM can serve from `matched_blocks` leading cached blocks.

    vLLM always computes the last prompt token (it needs its logits), so a fully
    cached prompt still recomputes its last block.
    """
    return min(matched_blocks, (prompt_len - 1) // block_size) * block_size
