"""Re-driving one stage of an archived run (see plumbing/run_log.py) into a new run id.

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
  are trained on with the learner's Trainer and a fixed seed, in one of two modes:
  * recorded steps (when the live learner's outcome log is found, see
    `find_step_list`): every step trains exactly the samples the live step trained,
    in the same order and groups, scored by the same Reward (its id is recorded), with
    the live learner's torch thread count. Each new version's safetensors checksum is
    compared with the PolicyUpdate the live learner published: on the same machine
    type they are byte-identical (tests/test_learner_replay.py).
  * assembled (no outcome log): the learner's GroupBuffer joins completions and
    rewards in the order the broker appended the rewards, hands out `groups_per_step`
    groups a step and applies its staleness rule, with one torch thread by default.
    This mode cannot know which groups timed out or how the topics interleaved live,
    so it reproduces a replay (same seed + data, same bytes), not the live weights.
  The weights' sha256 after every step is reported in both modes.
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

from plumbing.config import Config
from plumbing.run_log import RunLog, run_dir_name, write_json_atomically
from producers.prompt_replay import derived_id, replay_prompts, replayed_prompts
from schemas import Completion, Reward, RewardStatus

log = logging.getLogger(__name__)


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
            rows.append(
                RescoredRow(
                    completion_id=c.id,
                    task=target.task,
                    original_verifier=orig.verifier_version if orig else None,
                    original_scalar=orig.scalar if orig else None,
                    original_status=orig.status.value if orig else None,
                    replay_verifier=f"{fn.name}@{fn.version}" if fn else target.task,
                    replay_scalar=scalar,
                    replay_status=status,
                    error=error,
                )
            )
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
        pairs = [
            (r.original_scalar, r.replay_scalar)
            for r in rs
            if r.original_scalar is not None and r.replay_scalar is not None
        ]
        out.append(
            VerifierDiff(
                original_verifier=orig,
                replay_verifier=rep,
                completions=len(rs),
                original_mean=sum(o for o, _ in pairs) / len(pairs) if pairs else float("nan"),
                replay_mean=sum(n for _, n in pairs) / len(pairs) if pairs else float("nan"),
                changed=sum(o != n for o, n in pairs) + sum(r.replay_scalar is None for r in rs),
                status_changed=sum(r.original_status != r.replay_status for r in rs),
                max_abs_diff=max((abs(o - n) for o, n in pairs), default=0.0),
            )
        )
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
    source_step: int = -1  # recorded steps: the live step replayed
    version: int = 0  # the policy version this step made


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
    mode: str = "assembled"  # or "recorded_steps": the live learner's step list, replayed exactly
    step_list: str = ""  # the outcome log replayed (recorded_steps)
    samples_missing: int = 0  # recorded steps: samples the run log lacks (the replay cannot be exact)
    steps_mismatched: int = 0  # recorded steps: steps whose update (new version or none) differs from the live one
    identical_versions: list[int] = []  # versions whose replayed file checksum equals the live PolicyUpdate's
    different_versions: list[int] = []  # versions whose checksums differ


def tensors_sha256(model: Any) -> str:
    """sha256 of every tensor of `model` (names sorted, raw bytes): the weights' identity."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def _rescored(r: Reward, scalar: float, status: RewardStatus) -> Reward:
    return msgspec.structs.replace(r, scalar=scalar, status=status)


def _synthetic_reward(c: Completion, scalar: float, status: RewardStatus) -> Reward:
    """A re-scored completion's reward (no recorded one to carry the score)."""
    return Reward(
        run_id=c.run_id,
        id=f"rescored:{c.id}",
        completion_id=c.id,
        request_id=c.request_id,
        group_id=c.group_id,
        prompt_hash="",
        tokens_hash="",
        policy_version=c.policy_version,
        verifier_id="replay",
        verifier_version="replay",
        components={},
        scalar=scalar,
        status=status,
    )


def _scored_rewards(
    log_: RunLog, rewards: dict[str, tuple[float, RewardStatus]] | None, verifier_version: str | None
) -> list[Reward]:
    """The rewards to train with, in the order the broker appended them (re-scored ones
    replace the scores; completions re-scored without a recorded reward come last)."""
    recorded = [r for r in log_.rewards() if not verifier_version or r.verifier_version == verifier_version]
    if rewards is None:
        return recorded
    out, listed = [], set()
    for r in recorded:
        if r.completion_id in rewards and r.completion_id not in listed:
            listed.add(r.completion_id)
            out.append(_rescored(r, *rewards[r.completion_id]))
    out += [_synthetic_reward(c, *rewards[c.id]) for c in log_.completions() if c.id in rewards and c.id not in listed]
    return out


def assemble(
    log_: RunLog,
    rewards: dict[str, tuple[float, RewardStatus]] | None = None,
    verifier_version: str | None = None,
    *,
    max_policy_lag: int = 1_000_000,
) -> tuple[Any, int, int]:
    """(the learner's GroupBuffer holding the run's complete groups, incomplete groups,
    completions without reward): every completion taken in first, then the rewards in
    broker append order (so a group is ready when its last reward was appended; the
    first reward of a completion scores it); nothing expires.

    `rewards` replaces the recorded ones (completion id -> (scalar, status)), e.g. with a
    verifier replay's scores.
    """
    from learners.group_buffer import GroupBuffer

    buffer = GroupBuffer(max_policy_lag=max_policy_lag, group_timeout_s=float("inf"))
    scored_rewards = list(_scored_rewards(log_, rewards, verifier_version))
    bound = {r.completion_id for r in scored_rewards}
    # A session's turns are all on rollout.completions; only its last (the one its trajectory
    # carries, which the reward binds) is a sample, as in the live learner.
    completions = [c for c in log_.completions() if c.session is None or c.id in bound]
    for c in completions:
        buffer.add_completion(c, 0.0, 0)
    scored: set[str] = set()
    for r in scored_rewards:
        scored.add(r.completion_id)
        buffer.add_reward(r, 0.0, 0)
    without = sum(1 for c in completions if c.id not in scored)
    return buffer, len(buffer.state.groups), without


def training_groups(
    log_: RunLog, rewards: dict[str, tuple[float, RewardStatus]] | None = None, verifier_version: str | None = None
) -> tuple[list[list[Any]], int, int]:
    """(complete groups in the order their last reward was appended, incomplete groups, completions without reward):
    `assemble`'s ready groups."""
    buffer, incomplete, without = assemble(log_, rewards, verifier_version)
    return list(buffer.state.ready), incomplete, without


def find_step_list(cfg: Config, log_: RunLog) -> Path | None:
    """The live learner's outcome log (its step list) for the run: `<run log>/outcomes.jsonl`
    (copied in beside the archive), else `<state dir>/learner/<run id>/outcomes.jsonl`
    (where the learner writes it, beside its checkpoint); None when neither exists."""
    for path in (log_.path / "outcomes.jsonl", cfg.state_dir / "learner" / log_.run_id / "outcomes.jsonl"):
        if path.is_file():
            return path
    return None


def recorded_steps(path: Path) -> list[dict[str, Any]]:
    """The steps of an outcome log that took effect (the last line of each step number), in step order."""
    from learners.outcome_log import committed_steps, read_outcomes

    return [line for _, line in sorted(committed_steps(read_outcomes(path)).items())]


def _recorded_groups(
    line: dict[str, Any],
    completions: dict[str, Completion],
    by_reward_id: dict[str, Reward],
    first_reward: dict[str, Reward],
    rewards: dict[str, tuple[float, RewardStatus]] | None,
) -> tuple[list[list[Any]], int]:
    """A recorded step's groups, rebuilt from the run log (samples made as the learner made them),
    and how many of its samples the run log lacks."""
    from learners.group_buffer import binding_mismatch, sample_of

    ids: list[str] = line["ids"]
    reward_ids: list[str] = line.get("reward_ids") or [""] * len(ids)
    samples, missing = [], 0
    for cid, rid in zip(ids, reward_ids, strict=True):
        c = completions.get(cid)
        r = by_reward_id.get(rid) if rid else first_reward.get(cid)
        if rewards is not None and c is not None and cid in rewards:
            r = _rescored(r, *rewards[cid]) if r is not None else _synthetic_reward(c, *rewards[cid])
        if c is None or r is None or binding_mismatch(c, r) is not None:
            missing += 1
            continue
        samples.append(sample_of(c, r))
    sizes = line.get("group_sizes")
    groups: list[list[Any]] = []
    if sizes is None or missing:  # an older log (or holes): consecutive samples of one group id
        for smp in samples:
            if groups and groups[-1][0].group_id == smp.group_id:
                groups[-1].append(smp)
            else:
                groups.append([smp])
    else:
        i = 0
        for n in sizes:
            groups.append(samples[i : i + n])
            i += n
    return groups, missing


def replay_learner(
    cfg: Config,
    log_: RunLog,
    new_run: str,
    *,
    rewards: dict[str, tuple[float, RewardStatus]] | None = None,
    verifier_version: str | None = None,
    save_dir: Path | None = None,
    registry: CollectorRegistry | None = None,
    progress: bool = False,
    threads: int | None = None,
    step_list: Path | None = None,
    use_step_list: bool = True,
) -> LearnerReplay:
    """Train a fresh policy on the run's recorded samples (see the module doc); `cfg.learner`
    gives seed, algorithm and step size, `cfg.engine.model` the starting weights.

    `step_list`: the live learner's outcome log (default: `find_step_list`; `use_step_list=False`
    assembles groups instead). `threads`: torch threads (default: the live learner's recorded
    count when replaying its steps, else 1).
    """
    import tempfile

    import torch

    from learners.service import build_trainer

    t0 = time.perf_counter()
    lc = cfg.learner
    if use_step_list and step_list is None:
        step_list = find_step_list(cfg, log_)
    recorded = recorded_steps(step_list) if use_step_list and step_list is not None else []
    if threads is None:
        # The live learner's count: a reduction splits its work by thread, so another count
        # can give other low bits. One thread otherwise: the same bytes on any machine.
        threads = next((int(line["threads"]) for line in recorded if line.get("threads")), 1)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    trainer = build_trainer(cfg)  # seeds torch with cfg.learner.seed, as the live learner's
    initial = tensors_sha256(trainer.model.lm)
    m_steps = (
        Gauge("primerl_replay_learner_steps", "Replayed update steps done", registry=registry) if registry else None
    )
    version = 0
    steps: list[StepRecord] = []
    file_checksums: dict[int, str] = {}
    scratch = None
    if recorded and save_dir is None:  # the live checksums are of safetensors files: write ours to compare
        scratch = tempfile.TemporaryDirectory(prefix="replay-policies-")
    out_dir = save_dir if save_dir is not None else (Path(scratch.name) if scratch else None)

    def train(step: int, groups: list[list[Any]]) -> bool:
        nonlocal version
        stats = trainer.step(step, version + 1, groups, version)
        if stats is None:
            return False
        version += 1
        steps.append(
            StepRecord(
                step=len(steps),
                groups=len(groups),
                samples=stats.samples,
                reward_mean=stats.reward_mean,
                loss=stats.loss,
                weights_sha256=tensors_sha256(trainer.model.lm),
                source_step=step,
                version=version,
            )
        )
        if m_steps is not None:
            m_steps.set(len(steps))
        if out_dir is not None:
            file_checksums[version] = trainer.model.save_policy(out_dir / f"v{version}")
            if scratch is not None:
                import shutil

                shutil.rmtree(out_dir / f"v{version}", ignore_errors=True)
        log.info(
            "replay step %d: %d groups, %d samples, loss %.5f, weights %s",
            steps[-1].step,
            len(groups),
            stats.samples,
            stats.loss,
            steps[-1].weights_sha256[:16],
        )
        return True

    missing = mismatched = stale = 0
    try:
        if recorded:
            completions = {c.id: c for c in log_.completions()}
            all_rewards = log_.rewards()
            by_id = {r.id: r for r in all_rewards}
            first: dict[str, Reward] = {}
            for r in all_rewards:
                if not verifier_version or r.verifier_version == verifier_version:
                    first.setdefault(r.completion_id, r)
            _, incomplete, without = assemble(log_, rewards, verifier_version)
            groups_total = 0
            for line in tqdm(recorded, unit="step", desc="replay learner", disable=not progress):
                groups, lacking = _recorded_groups(line, completions, by_id, first, rewards)
                missing += lacking
                groups_total += len(groups)
                if train(int(line["step"]), groups) != bool(line.get("updated", True)):
                    mismatched += 1
        else:
            buffer, incomplete, without = assemble(log_, rewards, verifier_version, max_policy_lag=lc.max_policy_lag)
            groups_total = buffer.ready_groups
            bar = tqdm(total=groups_total, unit="group", desc="replay learner", disable=not progress)
            step = 0
            while buffer.ready_groups:
                before = buffer.ready_groups
                taken = buffer.take(lc.groups_per_step, version)  # the learner's staleness rule
                bar.update(before - buffer.ready_groups)
                stale += sum(len(d.ids) for d in taken.drops)
                train(step, taken.groups)
                step += 1
            bar.close()
    finally:
        if scratch is not None:
            scratch.cleanup()
    updates = log_.policy_updates()
    original = {u.version: u.checksum for u in updates}
    same = sorted(v for v, c in file_checksums.items() if v in original and original[v] == c)
    return LearnerReplay(
        source_run=log_.run_id,
        new_run=new_run,
        seed=lc.seed,
        threads=threads,
        groups_per_step=lc.groups_per_step,
        groups_total=groups_total,
        groups_incomplete=incomplete,
        samples_without_reward=without,
        stale_dropped=stale,
        steps=steps,
        initial_sha256=initial,
        final_sha256=tensors_sha256(trainer.model.lm),
        original_policy_versions=sorted(u.version for u in updates),
        original_checksums=original,
        replay_file_checksums=file_checksums,
        wall_s=time.perf_counter() - t0,
        mode="recorded_steps" if recorded else "assembled",
        step_list=str(step_list) if recorded else "",
        samples_missing=missing,
        steps_mismatched=mismatched,
        identical_versions=same,
        different_versions=sorted(v for v, c in file_checksums.items() if v in original and original[v] != c),
    )


def save_learner_replay(root: Path, result: LearnerReplay) -> Path:
    """<root>/<new_run>/replay_learner.json."""
    path = root / run_dir_name(result.new_run) / "replay_learner.json"
    write_json_atomically(path, msgspec.to_builtins(result))
    return path


__all__ = [
    "LearnerReplay",
    "RescoredRow",
    "RunLog",
    "StepRecord",
    "VerifierDiff",
    "assemble",
    "derived_id",
    "find_step_list",
    "recorded_steps",
    "replay_learner",
    "replay_prompts",
    "replayed_prompts",
    "rescore",
    "save_learner_replay",
    "save_rescored",
    "tensors_sha256",
    "training_groups",
    "verifier_diff",
]
