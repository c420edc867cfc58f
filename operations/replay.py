"""Re-driving one stage of an archived run (see operations/run_log.py) into a new run id.

- prompts: the recorded prompt requests are published again under the new run id,
  with ids derived from (new run, old id), so replaying twice into one run id is
  deduplicated by the engines' ledger instead of generating twice.
- verifier: the recorded completions are scored again in this process with the
  verifiers' own reward functions (verifier_workers.rewards), nothing regenerated.
  In-process rather than through a verifier worker: the verifier's ledger and reward
  ids are keyed by completion id and verifier version, so re-publishing completions
  would need new ids to be scored again, and the comparison would wait on a round
  trip; scoring directly is the same code, deterministic, and gives the diff at once.
- learner: the recorded completions joined with their recorded (or re-scored) rewards
  are trained on with the learner's Trainer, in the order the broker appended the rewards,
  `groups_per_step` groups a step, the staleness rule of the learner, a fixed seed
  and one torch thread; the weights' sha256 after every step is reported, so the
  same seed and data can be shown to give the same weights byte for byte.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
from prometheus_client import CollectorRegistry, Gauge
from tqdm import tqdm

from operations.publish import PublishReport, publish_requests
from operations.run_log import read_messages, run_dir_name, write_json_atomically
from plumbing.config import Config
from schemas import Completion, PolicyUpdate, PromptRequest, Reward, RewardStatus
from schemas.topics import COMPLETIONS, POLICY, PROMPTS, REWARDS

log = logging.getLogger(__name__)


def derived_id(new_run: str, old_id: str) -> str:
    """The id of a replayed message: deterministic in (new run, original id)."""
    return hashlib.sha256(f"{new_run}|{old_id}".encode()).hexdigest()[:32]


class RunLog:
    """The decoded records of one archived run (first occurrence of each id, in broker append order)."""

    def __init__(self, root: Path, run_id: str) -> None:
        self.run_id = run_id
        self.path = root / run_dir_name(run_id)
        if not self.path.is_dir():
            raise FileNotFoundError(f"no run log for {run_id!r} under {root} (is `primerl archive` running?)")

    def _unique(self, topic: str) -> list[Any]:
        seen: set[str] = set()
        out = []
        for _, msg in read_messages(self.path, topic):
            if msg.id not in seen:
                seen.add(msg.id)
                out.append(msg)
        return out

    def prompts(self) -> list[PromptRequest]:
        """Recorded prompt requests."""
        return self._unique(PROMPTS.name)

    def completions(self) -> list[Completion]:
        """Recorded final completions."""
        return self._unique(COMPLETIONS.name)

    def rewards(self) -> list[Reward]:
        """Recorded rewards (every verifier version)."""
        return self._unique(REWARDS.name)

    def policy_updates(self) -> list[PolicyUpdate]:
        """Recorded policy updates."""
        return self._unique(POLICY.name)


# ---- prompts ---------------------------------------------------------------------------------


def replayed_prompts(log_: RunLog, new_run: str) -> list[PromptRequest]:
    """The run's prompt requests under `new_run`: new derived ids, groups and sessions kept together."""
    out = []
    for req in log_.prompts():
        out.append(msgspec.structs.replace(
            req,
            id=derived_id(new_run, req.id),
            run_id=new_run,
            group_id=derived_id(new_run, req.group_id),
            session_id=derived_id(new_run, req.session_id) if req.session_id else None,
            created_at=time.time(),
            metadata={**req.metadata, "replay_of": f"{log_.run_id}/{req.id}"},
        ))
    return out


async def replay_prompts(cfg: Config, log_: RunLog, new_run: str, *, rate: float = 0.0, progress: bool = True,
                         registry: CollectorRegistry | None = None) -> PublishReport:
    """Publish the run's prompts again under `new_run`."""
    reqs = replayed_prompts(log_, new_run)
    if not reqs:
        raise ValueError(f"run {log_.run_id} has no archived prompt requests")
    return await publish_requests(cfg, reqs, rate=rate, progress=progress, registry=registry)


# ---- verifier --------------------------------------------------------------------------------


class RescoredRow(msgspec.Struct, kw_only=True):
    """One completion's original and replayed reward."""

    completion_id: str
    task: str
    original_verifier: str | None
    original_scalar: float | None
    original_status: str | None
    replay_verifier: str
    replay_scalar: float | None
    replay_status: str
    error: str | None = None


class VerifierDiff(msgspec.Struct, kw_only=True):
    """Per (original verifier version -> replay verifier): counts, means, and how many changed."""

    original_verifier: str
    replay_verifier: str
    completions: int
    original_mean: float
    replay_mean: float
    changed: int
    status_changed: int
    max_abs_diff: float


def _first_reward_per_completion(rewards: list[Reward], verifier_version: str | None) -> dict[str, Reward]:
    out: dict[str, Reward] = {}
    for r in rewards:
        if verifier_version and r.verifier_version != verifier_version:
            continue
        out.setdefault(r.completion_id, r)
    return out


async def rescore(log_: RunLog, *, task: str | None = None, verifier_version: str | None = None) -> list[RescoredRow]:
    """Score every recorded completion again (with `task`'s reward function instead of each
    completion's own, when given), next to its original reward."""
    from verifier_workers.rewards import UnknownTask, build_registry, close_registry, score_completion

    fns = build_registry()
    originals = _first_reward_per_completion(log_.rewards(), verifier_version)
    rows = []
    try:
        for c in log_.completions():
            target = msgspec.structs.replace(c, task=task) if task else c
            orig = originals.get(c.id)
            fn = fns.get(target.task)
            try:
                score = await score_completion(fns, target)
                scalar, status, error = score.scalar, score.status.value, None
            except UnknownTask as err:
                scalar, status, error = None, "UNKNOWN_TASK", str(err)
            rows.append(RescoredRow(
                completion_id=c.id, task=target.task,
                original_verifier=orig.verifier_version if orig else None,
                original_scalar=orig.scalar if orig else None,
                original_status=orig.status.value if orig else None,
                replay_verifier=f"{fn.name}@{fn.version}" if fn else target.task,
                replay_scalar=scalar, replay_status=status, error=error,
            ))
    finally:
        await close_registry(fns)
    return rows


def verifier_diff(rows: list[RescoredRow]) -> list[VerifierDiff]:
    """The rows summed per (original verifier, replay verifier)."""
    by: dict[tuple[str, str], list[RescoredRow]] = defaultdict(list)
    for r in rows:
        by[(r.original_verifier or "(no original reward)", r.replay_verifier)].append(r)
    out = []
    for (orig, rep), rs in sorted(by.items()):
        pairs = [(r.original_scalar, r.replay_scalar) for r in rs if r.original_scalar is not None and r.replay_scalar is not None]
        out.append(VerifierDiff(
            original_verifier=orig, replay_verifier=rep, completions=len(rs),
            original_mean=sum(o for o, _ in pairs) / len(pairs) if pairs else float("nan"),
            replay_mean=sum(n for _, n in pairs) / len(pairs) if pairs else float("nan"),
            changed=sum(o != n for o, n in pairs) + sum(r.replay_scalar is None for r in rs),
            status_changed=sum(r.original_status != r.replay_status for r in rs),
            max_abs_diff=max((abs(o - n) for o, n in pairs), default=0.0),
        ))
    return out


def save_rescored(root: Path, new_run: str, rows: list[RescoredRow], diff: list[VerifierDiff], source_run: str) -> Path:
    """<root>/<new_run>/replay_verifier.parquet (per completion) and .json (the diff); returns the folder."""
    out = root / run_dir_name(new_run)
    out.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([msgspec.to_builtins(r) for r in rows])
    tmp = out / "replay_verifier.parquet.tmp"
    pq.write_table(table, tmp)
    tmp.replace(out / "replay_verifier.parquet")
    write_json_atomically(out / "replay_verifier.json", {"source_run": source_run, "diff": msgspec.to_builtins(diff)})
    return out


# ---- learner ---------------------------------------------------------------------------------


class StepRecord(msgspec.Struct, kw_only=True):
    """One replayed update."""

    step: int
    groups: int
    samples: int
    reward_mean: float
    loss: float
    weights_sha256: str  # sha256 over the tensors (sorted by name), after the step


class LearnerReplay(msgspec.Struct, kw_only=True):
    """What a learner replay did and how it compares with the original run."""

    source_run: str
    new_run: str
    seed: int
    threads: int
    groups_per_step: int
    groups_total: int
    groups_incomplete: int
    samples_without_reward: int
    stale_dropped: int
    steps: list[StepRecord]
    initial_sha256: str
    final_sha256: str
    original_policy_versions: list[int]
    original_checksums: dict[int, str]  # PolicyUpdate.checksum (sha256 of the safetensors files) per version
    replay_file_checksums: dict[int, str] = {}  # same measure for the replay, when saved
    wall_s: float = 0.0


def tensors_sha256(model: Any) -> str:
    """sha256 of every tensor of `model` (names sorted, raw bytes): the weights' identity."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def training_groups(log_: RunLog, rewards: dict[str, tuple[float, RewardStatus]] | None = None,
                    verifier_version: str | None = None) -> tuple[list[list[Any]], int, int]:
    """(complete groups in the order their last reward was appended, incomplete groups, completions without reward).

    `rewards` replaces the recorded ones (completion id -> (scalar, status)), e.g. with a
    verifier replay's scores.
    """
    from learners.samples import Sample

    completions = {c.id: c for c in log_.completions()}
    recorded = log_.rewards()
    order: list[str] = []  # completion ids in reward append order
    scores: dict[str, tuple[float, RewardStatus]] = {}
    for r in recorded:
        if verifier_version and r.verifier_version != verifier_version:
            continue
        if r.completion_id not in scores:
            scores[r.completion_id] = (r.scalar, r.status)
            order.append(r.completion_id)
    if rewards is not None:
        # The recorded arrival order first, then completions that had no recorded reward.
        listed = set(order)
        order = [cid for cid in order + [c for c in completions if c not in listed] if cid in rewards]
        scores = {cid: rewards[cid] for cid in order}
    groups: dict[str, list[Sample]] = {}
    done: list[list[Sample]] = []
    for cid in order:
        c = completions.get(cid)
        if c is None:
            continue
        scalar, status = scores[cid]
        g = groups.setdefault(c.group_id, [])
        if any(s.sample_index == c.sample_index for s in g):
            continue
        g.append(Sample(completion_id=c.id, group_id=c.group_id, group_size=c.group_size, sample_index=c.sample_index,
                        prompt_token_ids=c.prompt_token_ids, token_ids=c.token_ids, logprobs=c.logprobs,
                        policy_version=c.policy_version, reward=scalar, status=status))
        if len(g) == c.group_size:
            done.append(sorted(groups.pop(c.group_id), key=lambda s: s.sample_index))
    without = sum(1 for cid in completions if cid not in scores)
    return done, len(groups), without


def replay_learner(cfg: Config, log_: RunLog, new_run: str, *, rewards: dict[str, tuple[float, RewardStatus]] | None = None,
                   verifier_version: str | None = None, save_dir: Path | None = None,
                   registry: CollectorRegistry | None = None, progress: bool = False, threads: int = 1) -> LearnerReplay:
    """Train a fresh policy on the run's recorded samples (see the module doc); `cfg.learner`
    gives seed, algorithm and step size, `cfg.engine.model` the starting weights."""
    import torch

    from learners.service import build_trainer

    t0 = time.perf_counter()
    # One thread by default: reductions in a fixed order, the same bytes on any machine. The
    # live learner uses torch's default (all cores), so matching its bytes needs its count.
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    groups, incomplete, without = training_groups(log_, rewards, verifier_version)
    trainer = build_trainer(cfg)  # seeds torch with cfg.learner.seed
    initial = tensors_sha256(trainer.model.lm)
    m_steps = Gauge("primerl_replay_learner_steps", "Replayed update steps done", registry=registry) if registry else None
    lc = cfg.learner
    version = 0
    stale = 0
    steps: list[StepRecord] = []
    file_checksums: dict[int, str] = {}
    bar = tqdm(total=len(groups), unit="group", desc="replay learner", disable=not progress)
    for i in range(0, len(groups), lc.groups_per_step):
        batch = groups[i : i + lc.groups_per_step]
        bar.update(len(batch))
        fresh = [g for g in batch if all(version - s.policy_version <= lc.max_policy_lag for s in g)]
        stale += sum(len(g) for g in batch) - sum(len(g) for g in fresh)
        stats = trainer.step(len(steps), version + 1, fresh, version)
        if stats is None:
            continue
        version += 1
        steps.append(StepRecord(step=len(steps), groups=len(fresh), samples=stats.samples, reward_mean=stats.reward_mean,
                                loss=stats.loss, weights_sha256=tensors_sha256(trainer.model.lm)))
        if m_steps is not None:
            m_steps.set(len(steps))
        if save_dir is not None:
            file_checksums[version] = trainer.model.save_policy(save_dir / f"v{version}")
        log.info("replay step %d: %d groups, %d samples, loss %.5f, weights %s", steps[-1].step, len(fresh), stats.samples,
                 stats.loss, steps[-1].weights_sha256[:16])
    bar.close()
    updates = log_.policy_updates()
    return LearnerReplay(
        source_run=log_.run_id, new_run=new_run, seed=lc.seed, threads=threads, groups_per_step=lc.groups_per_step,
        groups_total=len(groups), groups_incomplete=incomplete, samples_without_reward=without, stale_dropped=stale,
        steps=steps, initial_sha256=initial, final_sha256=tensors_sha256(trainer.model.lm),
        original_policy_versions=sorted(u.version for u in updates),
        original_checksums={u.version: u.checksum for u in updates},
        replay_file_checksums=file_checksums, wall_s=time.perf_counter() - t0,
    )


def save_learner_replay(root: Path, result: LearnerReplay) -> Path:
    """<root>/<new_run>/replay_learner.json."""
    path = root / run_dir_name(result.new_run) / "replay_learner.json"
    write_json_atomically(path, msgspec.to_builtins(result))
    return path


__all__ = [
    "LearnerReplay", "RescoredRow", "RunLog", "StepRecord", "VerifierDiff", "derived_id", "replay_learner", "replay_prompts",
    "replayed_prompts", "rescore", "save_learner_replay", "save_rescored", "tensors_sha256", "training_groups", "verifier_diff",
]
