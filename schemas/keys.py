"""Every Redis key the stages share, built in one place.

primerl:registry:<role>:<w>     JSON WorkerInfo (schemas/registry.py), TTL: heartbeats
primerl:kv:<w>                  SET of block hashes worker w's engine holds (KV events)
primerl:kvp:<w>                 ZSET of block hashes routed to w, not yet reported stored
primerl:load:<w>                HASH prefill / decode tokens routed to w, not yet served
primerl:sessions:<w>            ZSET of session keys whose last turn was routed to w (score: when)
primerl:ledger:<stage>:<id>     a processed-id ledger entry (plumbing/ledger.py)
primerl:policy:<run>:version    the newest policy version a run's learner published
primerl:resume:<request id>     "partition:offset" of a request's first chunk (engine_workers/resume.py), TTL
"""

from __future__ import annotations

_REGISTRY = "primerl:registry:"
_POLICY = "primerl:policy:"
_VERSION = ":version"


def registry(role: str, worker_id: str) -> str:
    """A worker's registry entry."""
    return f"{_REGISTRY}{role}:{worker_id}"


def registry_pattern(role: str = "") -> str:
    """SCAN pattern of the registry entries of `role` ("" = every role)."""
    return f"{_REGISTRY}{role}:*" if role else f"{_REGISTRY}*"


def held_blocks(worker_id: str) -> str:
    """Blocks a worker's engine holds."""
    return f"primerl:kv:{worker_id}"


def pending_blocks(worker_id: str) -> str:
    """Blocks routed to a worker, not yet reported stored."""
    return f"primerl:kvp:{worker_id}"


def load(worker_id: str) -> str:
    """Tokens routed to a worker and not yet served."""
    return f"primerl:load:{worker_id}"


def sessions(worker_id: str) -> str:
    """Sessions routed to a worker, by when their last turn was."""
    return f"primerl:sessions:{worker_id}"


def ledger_prefix(stage: str) -> str:
    """The prefix of a stage's processed-id ledger (the message id follows)."""
    return f"primerl:ledger:{stage}:"


def resume_hint(request_id: str) -> str:
    """Where a request's chunks start in rollout.completion-chunks (a resumed attempt reads from there)."""
    return f"primerl:resume:{request_id}"


def policy_version(run_id: str) -> str:
    """A run's newest published policy version (producers' admission, `primerl status`)."""
    return f"{_POLICY}{run_id}{_VERSION}"


POLICY_VERSION_PATTERN = f"{_POLICY}*{_VERSION}"


def run_of_policy_version(key: str) -> str:
    """The run id of a `policy_version` key (run ids may contain colons)."""
    return key[len(_POLICY) : -len(_VERSION)]
