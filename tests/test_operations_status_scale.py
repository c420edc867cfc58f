"""`primerl status` against the real broker and Redis (registry entries written by the test,
as the workers write them), and `primerl scale` of verifier processes during a run."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import msgspec
import pytest

from operations.scale import read_workers, scale
from operations.status import cache_hit_rate, collect_status, consumer_groups
from plumbing.config import Config
from plumbing.kafka import Publisher
from plumbing.redis_client import connect_redis
from primerl.rewards_reader import RewardsReader
from schemas import DeadLetter
from schemas.topics import COMPLETIONS, DLQ
from tests.reward_helpers import as_engine, make_completion

ROOT = Path(__file__).resolve().parents[1]


def _entry(role: str, wid: str, **kw: object) -> bytes:
    return json.dumps(
        {
            "worker_id": wid,
            "role": role,
            "host": "h1",
            "pid": 1234,
            "partitions": [0, 1],
            "policy_version": 2,
            "heartbeat_at": time.time(),
            **kw,
        }
    ).encode()


async def test_status_reads_registry_groups_dlq_and_policy(cfg: Config, tmp_path: Path) -> None:
    redis = connect_redis(cfg)
    tag = uuid.uuid4().hex[:6]
    keys = {
        f"primerl:registry:engine:e1-{tag}": _entry(
            "engine",
            f"e1-{tag}",
            prompt_tokens=1000,
            cached_prompt_tokens=600,
            load_tokens=50.5,
            in_flight=2,
            block_size=16,
        ),
        f"primerl:registry:engine:e2-{tag}": _entry(
            "engine",
            f"e2-{tag}",
            prompt_tokens=1000,
            cached_prompt_tokens=200,
            load_tokens=0,
            extra_field="kept by the writer",
        ),
        f"primerl:registry:verifier:v1-{tag}": _entry("verifier", f"v1-{tag}"),
        f"primerl:registry:engine:bad-{tag}": b"not json",
    }
    try:
        for k, v in keys.items():
            await redis.set(k, v, ex=30)
        await redis.set(f"primerl:registry:engine:gone-{tag}", _entry("engine", "gone", prompt_tokens=10**6), px=1)
        await redis.set(f"primerl:policy:status-{tag}:version", 7)
        await asyncio.sleep(0.05)  # the 1 ms entry has expired: a dead worker's heartbeat
        async with Publisher(cfg) as pub:  # one dead letter more than before
            before = (await collect_status(cfg, redis)).dead_letters
            letter = DeadLetter(
                run_id=tag,
                stage="status-test",
                error_type="ValueError",
                error="test",
                source_topic=COMPLETIONS.name,
                partition=0,
                offset=0,
                payload=b"raw",
            )
            await pub.publish(DLQ.name, letter, key=b"status-test")
        report = await collect_status(cfg, redis)
        mine = [w for w in report.workers if w.worker_id.endswith(tag)]
        assert sorted(w.worker_id for w in mine) == sorted([f"e1-{tag}", f"e2-{tag}", f"v1-{tag}"])
        assert f"primerl:registry:engine:bad-{tag}" in report.bad_registry_entries
        assert cache_hit_rate([w for w in mine]) == pytest.approx(0.4)  # (600 + 200) / 2000
        assert report.policy_versions[f"status-{tag}"] == 7
        assert report.dead_letters >= before + 1  # end offsets: approximate on Tansu, never fewer
        assert any("Tansu" in n for n in report.notes)
        # The CLI shows the same (JSON), including groups the other tests' workers made.
        env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": cfg.bootstrap,
            "REDIS_URL": cfg.redis_url,
            "PYTHONPATH": str(ROOT),
        }
        out = subprocess.run(
            [sys.executable, "-m", "primerl", "status", "--json", "--all", "--state-dir", str(tmp_path)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        data = json.loads(out.stdout)
        assert {f"e1-{tag}", f"v1-{tag}"} <= {w["worker_id"] for w in data["workers"]}
        assert all({"group_id", "members", "lag", "total_lag"} <= set(g) for g in data["groups"])
        text = subprocess.run(
            [sys.executable, "-m", "primerl", "status", "--state-dir", str(tmp_path)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "live workers" in text.stdout and f"e1-{tag}" in text.stdout and "dead letters:" in text.stdout
    finally:
        await redis.delete(*keys, f"primerl:policy:status-{tag}:version")
        await redis.aclose()


async def _wait_members(cfg: Config, group: str, count: int, timeout_s: float = 30) -> None:
    """Wait until the broker describes `group` with `count` members."""
    deadline = time.monotonic() + timeout_s
    seen = -1
    while time.monotonic() < deadline:
        groups = {g.group_id: g for g in await consumer_groups(cfg, candidates=[group])}
        seen = len(groups[group].members) if group in groups else 0
        if seen == count:
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"group {group} has {seen} members, expected {count}")


async def test_scaling_verifiers_during_a_run_loses_and_duplicates_nothing(cfg: Config, tmp_path: Path) -> None:
    """0 -> 2 -> 1 -> 0 verifier processes while completions flow: every completion gets
    exactly one reward record, and the group's members follow."""
    cfg.state_dir = tmp_path / "state"
    run_id = f"sc-{uuid.uuid4().hex[:8]}"
    n = 60
    completions = []
    for i in range(n):
        c = make_completion(f"<answer>{i}</answer>", task="math", reference=str(i if i % 3 else i + 1))
        completions.append(
            as_engine(
                msgspec.structs.replace(
                    c, id=f"{run_id}/{i}", run_id=run_id, request_id=f"{run_id}-r{i}", group_id=f"{run_id}-g{i}"
                ),
                cfg,  # the state dir's engine key, which the scaled verifiers trust
            )
        )
    async with Publisher(cfg) as pub, RewardsReader(cfg, run_id) as reader:
        try:
            await pub.publish_many(COMPLETIONS.name, [(c, c.group_id.encode()) for c in completions[:20]])
            up = await asyncio.to_thread(scale, cfg, "verifier", 2, start_timeout_s=90)
            assert len(up.started) == 2 and len(read_workers(cfg.state_dir)) == 2
            await _wait_members(cfg, "verifier", 2)
            await pub.publish_many(COMPLETIONS.name, [(c, c.group_id.encode()) for c in completions[20:40]])
            await reader.wait_for(10, timeout_s=60)
            down = await asyncio.to_thread(scale, cfg, "verifier", 1)
            assert [code for _, code in down.stopped] == [0]  # SIGTERM: finished, committed, exited cleanly
            await _wait_members(cfg, "verifier", 1)
            await pub.publish_many(COMPLETIONS.name, [(c, c.group_id.encode()) for c in completions[40:]])
            await reader.wait_for(n, timeout_s=120)
            await asyncio.sleep(3)  # a duplicate would arrive by now
        finally:
            last = await asyncio.to_thread(scale, cfg, "verifier", 0)
    assert all(code == 0 for _, code in last.stopped) and read_workers(cfg.state_dir) == []
    by_completion: dict[str, int] = {}
    for r in reader.rewards:
        by_completion[r.completion_id] = by_completion.get(r.completion_id, 0) + 1
    assert sorted(by_completion) == sorted(c.id for c in completions)
    assert set(by_completion.values()) == {1}, {k: v for k, v in by_completion.items() if v > 1}


def test_member_assignments_are_decoded_when_the_broker_sends_them() -> None:
    """Apache Kafka sends each member's assignment (Tansu sends none): it becomes topic:partition."""
    from aiokafka.protocol.group import MemberAssignment

    from operations.status import _members

    raw = MemberAssignment(0, [("rollout.prompts", [3, 1])], b"").encode()
    members = _members(
        [("m-1", "engine-ab", "/10.0.0.2", b"", raw), ("m-2", "c", "h", b"", b""), ("m-3", "c", "h", b"", b"\x00junk")]
    )
    assert [m.partitions for m in members] == [["rollout.prompts:1", "rollout.prompts:3"], [], []]
    assert members[0].client_id == "engine-ab" and members[0].host == "/10.0.0.2"


def test_scale_refuses_what_it_cannot_do(cfg: Config, tmp_path: Path) -> None:
    cfg.state_dir = tmp_path
    with pytest.raises(ValueError, match="unknown kind"):
        scale(cfg, "router", 1)
    with pytest.raises(ValueError, match="run id"):
        scale(cfg, "learner", 1)
    with pytest.raises(ValueError, match="one learner per run"):
        scale(cfg, "learner", 2, run_id="r")
    assert read_workers(tmp_path) == []


async def test_a_learner_is_scaled_up_and_down_for_its_run(cfg: Config, tmp_path: Path) -> None:
    """`scale learner 1 --run-id R` starts the run's learner (group learner-R); 0 stops it cleanly."""
    from plumbing.trust import generate_keypair

    cfg.state_dir = tmp_path / "state"
    generate_keypair(cfg.keys_dir, "learner-test-key")  # the learner refuses to start without a keyring
    run_id = f"ls-{uuid.uuid4().hex[:6]}"
    try:
        up = await asyncio.to_thread(scale, cfg, "learner", 1, run_id=run_id, start_timeout_s=180)
        assert len(up.started) == 1 and up.started[0].run_id == run_id
        await _wait_members(cfg, f"learner-{run_id}", 1, timeout_s=60)
        redis = connect_redis(cfg)
        try:  # status finds the learner's group through the policy key it writes, though Tansu does not list it
            for _ in range(100):
                if await redis.get(f"primerl:policy:{run_id}:version") is not None:
                    break
                await asyncio.sleep(0.2)
            report = await collect_status(cfg, redis)
        finally:
            await redis.aclose()
        assert report.policy_versions[run_id] == 0
        assert [len(g.members) for g in report.groups if g.group_id == f"learner-{run_id}"] == [1]
        again = await asyncio.to_thread(scale, cfg, "learner", 1, run_id=run_id)
        assert again.started == [] and again.stopped == []  # already there
    finally:
        down = await asyncio.to_thread(scale, cfg, "learner", 0, run_id=run_id)
    assert [code for _, code in down.stopped] == [0] and read_workers(cfg.state_dir) == []
    assert (cfg.state_dir / "learner" / run_id / "learner.ckpt").exists()  # it checkpointed on SIGTERM


def test_a_worker_that_exits_between_the_checks_of_a_stop_still_reports_its_exit_code(monkeypatch) -> None:
    # The worker exits right after a reap attempt found it running: it is a zombie when its
    # liveness is checked, and its clean exit must still come back as 0, not unknown.
    from operations import scale as scale_module

    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, sys; signal.signal(signal.SIGTERM, lambda *a: None); "
            "print('ready', flush=True); sys.stdin.readline(); sys.exit(0)",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdout.readline() == b"ready\n"  # its SIGTERM handler is in place
    worker = scale_module.WorkerProcess(
        role="verifier",
        pid=proc.pid,
        start_ticks=scale_module.start_ticks(proc.pid) or 0,
        cmdline=[],
        log_file="",
        metrics_port=0,
        started_at=time.time(),
    )
    real_reap = scale_module._reap
    calls = []

    def reap_then_exit(pid: int) -> int | None:
        code = real_reap(pid)
        if not calls:
            proc.stdin.close()  # the worker finishes now, after this reap saw it running
            deadline = time.monotonic() + 10
            while scale_module.start_ticks(pid) == worker.start_ticks and time.monotonic() < deadline:
                time.sleep(0.01)
        calls.append(code)
        return code

    monkeypatch.setattr(scale_module, "_reap", reap_then_exit)
    assert scale_module.stop_worker(worker, timeout_s=10) == 0
    proc.stdout.close()
