"""Archive a small real run (real broker, Redis, verifier worker, archiver) and replay it:
prompts re-published under a new run id, completions re-scored without regenerating,
a learner re-trained on the recorded rewards, byte for byte the same weights twice.

The completions are written by the test (no engine here; the engine-marked test in
test_operations_scale.py archives a run with the real engine)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from prometheus_client import CollectorRegistry

from archiver.archiver import Archiver
from operations.replay import RunLog, replay_learner, replay_prompts, rescore, verifier_diff
from plumbing.config import Config
from plumbing.kafka import Publisher
from plumbing.redis_client import connect_redis
from plumbing.trust import Signer, generate_keypair
from primerl.rewards_reader import RewardsReader
from producers.arithmetic import arithmetic_requests
from schemas import Completion, RewardStatus
from schemas.topics import COMPLETIONS, PROMPTS
from tests.kafka_helpers import wait_until
from tests.ops_helpers import prompts_of_run, tiny_llama
from tests.reward_helpers import char_tokens, engine_signed, make_completion
from verifier_workers.rewards import build_registry, close_registry
from verifier_workers.worker import VerifierWorker

ROOT = Path(__file__).resolve().parents[1]
GROUPS, G = 4, 4


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The learner replay's starting policy (tests.ops_helpers.tiny_llama). The real SmolLM2
    replay is measured in the README."""
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def _completions(cfg: Config, run_id: str, prompts, model_dir: str) -> list[Completion]:
    """G samples per prompt, some right, some wrong, some without an answer (POLICY_FAIL),
    with the starting policy's own log-probs (ratio 1, as if it had sampled them). Their
    token_ids decode to their text with the engine's tokenizer (one token per character: ids
    the tiny model has) and they are engine-signed, so the verifier's custody checks pass."""
    import torch

    from learners.policy_model import Batch, PolicyModel

    policy = PolicyModel(model_dir)
    out = []
    for gi, req in enumerate(prompts):
        for i in range(G):
            answer = [
                "<answer>" + (req.reference or "") + "</answer>",
                "<answer>999</answer>",
                "no idea",
                "<answer>7</answer>",
            ][(i + gi) % 4]
            c = make_completion(answer, task=req.task, reference=req.reference)
            prompt, tokens = [2, 40 + gi, 50], char_tokens(answer, cfg)
            batch = Batch([prompt], [tokens], [[]], policy.pad_id)
            with torch.no_grad():
                logp, _ = policy(batch)
            out.append(
                engine_signed(
                    msgspec.structs.replace(
                        c,
                        id=f"{req.id}/{i}",
                        run_id=run_id,
                        request_id=req.id,
                        group_id=req.group_id,
                        group_size=G,
                        sample_index=i,
                        prompt_token_ids=prompt,
                        prompt_tokens=len(prompt),
                        token_ids=tokens,
                        logprobs=logp[0][batch.mask[0] == 1].tolist(),
                        policy_version=0,
                    ),
                    cfg,
                )
            )
    return out


@pytest.fixture
async def archived_run(cfg: Config, tmp_path: Path, tiny_model: str) -> AsyncIterator[tuple[Config, str, Path]]:
    """A run: prompts + completions published, rewarded by a real verifier worker, archived."""
    cfg.archive.flush_interval_s = 0.5
    cfg.archive.root = tmp_path / "runs"
    run_id = f"rp-{uuid.uuid4().hex[:8]}"
    # More tokens than the context: a live engine of the session dead-letters them instead
    # of generating completions under the ids this fixture publishes itself.
    prompts = arithmetic_requests(run_id, GROUPS, G, seed=7, max_tokens=100_000)
    priv, _ = generate_keypair(tmp_path / "keys", "replay-key")
    fns = build_registry()
    redis = connect_redis(cfg)
    registry = CollectorRegistry()
    archiver = Archiver(cfg, registry, group_id=f"archiver-{run_id}")
    async with Publisher(cfg) as pub, RewardsReader(cfg, run_id) as reader:
        verifier = VerifierWorker(cfg, fns, Signer.from_file(priv), pub, redis, CollectorRegistry())
        tasks = [asyncio.create_task(verifier.run()), asyncio.create_task(archiver.run())]
        try:
            await pub.publish_many(PROMPTS.name, [(r, r.routing_key()) for r in prompts])
            await pub.publish_many(
                COMPLETIONS.name, [(c, c.group_id.encode()) for c in _completions(cfg, run_id, prompts, tiny_model)]
            )
            await reader.wait_for(GROUPS * G, timeout_s=90)

            def archived() -> bool:
                path = cfg.archive.root / run_id / "manifest.json"
                counts = json.loads(path.read_text())["messages_per_topic"] if path.exists() else {}
                return counts == {PROMPTS.name: GROUPS, COMPLETIONS.name: GROUPS * G, "rollout.rewards": GROUPS * G}

            await wait_until(archived, 60, "the run archived")
        finally:
            verifier.stop()
            archiver.stop()
            await asyncio.gather(*tasks)
    await close_registry(fns)
    await redis.aclose()
    yield cfg, run_id, cfg.archive.root


async def test_replays_of_an_archived_run(archived_run, tiny_model: str) -> None:
    cfg, run_id, root = archived_run
    log_ = RunLog(root, run_id)
    manifest = json.loads((root / run_id / "manifest.json").read_text())
    assert manifest["signing_key_ids"] == ["replay-key"] and manifest["policy_versions"] == [0]

    # Verifier: the same reward functions give identical rewards, without regenerating.
    rows = await rescore(log_)
    assert len(rows) == GROUPS * G
    assert all(r.original_scalar == r.replay_scalar and r.original_status == r.replay_status for r in rows)
    diff = verifier_diff(rows)
    assert [d.changed for d in diff] == [0] and diff[0].original_mean == diff[0].replay_mean
    statuses = {r.replay_status for r in rows}
    assert {"OK", "POLICY_FAIL"} <= statuses  # the run had right, wrong and unanswered samples
    # Another verifier (plain `math`, no format half-credit) changes the rewards, and the diff says so.
    other = verifier_diff(await rescore(log_, task="math"))
    assert other[0].replay_verifier.startswith("math@") and other[0].changed > 0

    # Learner: same seed + data -> the same weights, byte for byte; other rewards -> other weights.
    cfg.engine.model = tiny_model
    cfg.learner.groups_per_step = 2
    cfg.learner.lr = 1e-3  # the tiny model needs a visible step
    first = await asyncio.to_thread(replay_learner, cfg, log_, "replay-a")
    second = await asyncio.to_thread(replay_learner, cfg, log_, "replay-b")
    assert first.groups_total == GROUPS and first.samples_without_reward == 0
    assert len(first.steps) == 2 and all(s.samples > 0 for s in first.steps)
    assert [s.weights_sha256 for s in first.steps] == [s.weights_sha256 for s in second.steps]
    assert first.final_sha256 == second.final_sha256 != first.initial_sha256
    # Rewards reversed: the gradients change sign. (Merely rescaled rewards could give the same
    # bytes: Adam's first steps move every weight by about lr * sign(gradient).)
    reversed_scores = {r.completion_id: (1.0 - (r.replay_scalar or 0.0), RewardStatus.OK) for r in rows}
    third = await asyncio.to_thread(replay_learner, cfg, log_, "replay-c", rewards=reversed_scores)
    assert third.final_sha256 != first.final_sha256

    # Prompts: published again under a new run id, same content, new derived ids.
    new_run = f"{run_id}-again"
    report = await replay_prompts(cfg, log_, new_run, progress=False)
    assert report.requests == GROUPS
    seen = await prompts_of_run(cfg, new_run, GROUPS)
    originals = {r.id: r for r in log_.prompts()}
    assert len(seen) == GROUPS
    for r in seen:
        orig = originals[r.metadata["replay_of"].split("/", 1)[1]]
        assert (
            r.id != orig.id
            and r.messages == orig.messages
            and r.reference == orig.reference
            and r.group_size == orig.group_size
        )


def test_replay_cli(archived_run, tiny_model: str) -> None:
    cfg, run_id, root = archived_run
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": cfg.bootstrap,
        "REDIS_URL": cfg.redis_url,
        "PYTHONPATH": str(ROOT),
        "PRIMERL_LEARNER__GROUPS_PER_STEP": "2",
        "PRIMERL_LEARNER__LR": "0.001",
    }
    base = [
        sys.executable,
        "-m",
        "primerl",
        "replay",
        run_id,
        "--root",
        str(root),
        "--new-run-id",
        "cli-replay",
        "--state-dir",
        str(root.parent / "state"),
    ]
    verifier = subprocess.run(
        [*base, "--stage", "verifier"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert verifier.returncode == 0, verifier.stderr
    assert f"re-scored {GROUPS * G} completions" in verifier.stdout
    table_row = [line for line in verifier.stdout.splitlines() if line.startswith("1/math_format@")][0]
    assert table_row.split()[-3:] == ["0", "0", "0.0000"]  # changed, status changed, max |d|
    learner = subprocess.run(
        [*base, "--stage", "learner", "--model", tiny_model, "--rescored"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert learner.returncode == 0, learner.stderr
    assert "step 1:" in learner.stdout and "final weights sha256 (tensors):" in learner.stdout
    report = json.loads((root / "cli-replay" / "replay_learner.json").read_text())
    assert len(report["steps"]) == 2 and report["final_sha256"] in learner.stdout
