"""Replaying an archived run's prompts into a new run id (`primerl replay RUN --stage prompts`).

The recorded prompt requests are published again under the new run id, with ids derived
from (new run, old id), so replaying twice into one run id is deduplicated by the
engines' ledger instead of generating twice.
"""

from __future__ import annotations

import hashlib
import time

import msgspec
from prometheus_client import CollectorRegistry

from plumbing.config import Config
from plumbing.run_log import RunLog
from producers.publish import PublishReport, publish_requests
from schemas import PromptRequest


def derived_id(new_run: str, old_id: str) -> str:
    """The id of a replayed message: deterministic in (new run, original id)."""
    return hashlib.sha256(f"{new_run}|{old_id}".encode()).hexdigest()[:32]


def replayed_prompts(log_: RunLog, new_run: str) -> list[PromptRequest]:
    """The run's prompt requests under `new_run`: new derived ids, groups and sessions kept together."""
    out = []
    for req in log_.prompts():
        out.append(
            msgspec.structs.replace(
                req,
                id=derived_id(new_run, req.id),
                run_id=new_run,
                group_id=derived_id(new_run, req.group_id),
                session_id=derived_id(new_run, req.session_id) if req.session_id else None,
                created_at=time.time(),
                metadata={**req.metadata, "replay_of": f"{log_.run_id}/{req.id}"},
            )
        )
    return out


async def replay_prompts(
    cfg: Config,
    log_: RunLog,
    new_run: str,
    *,
    rate: float = 0.0,
    progress: bool = True,
    registry: CollectorRegistry | None = None,
) -> PublishReport:
    """Publish the run's prompts again under `new_run`."""
    reqs = replayed_prompts(log_, new_run)
    if not reqs:
        raise ValueError(f"run {log_.run_id} has no archived prompt requests")
    return await publish_requests(cfg, reqs, rate=rate, progress=progress, registry=registry)
