"""The least-privilege map (schemas/access.py) covers what the code uses, and deploy/acl/ is current."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, NoPermissionError

from archiver.archiver import ARCHIVER_GROUP
from engine_workers.deferral import DEFERRAL_GROUP
from engine_workers.worker import ENGINE_GROUP
from plumbing.ledger import Ledger
from plumbing.local_servers import start_redis, stop_process
from plumbing.prefix_cache.held_blocks import HeldBlocks
from plumbing.prefix_cache.index import PrefixIndex
from router.router import ROUTER_GROUP
from schemas import keys, topics
from schemas.access import PRINCIPALS
from schemas.registry import WorkerInfo
from scripts.render_acls import KAFKA_FILE, REDIS_FILE, password_var, render_kafka, render_redis
from verifier_workers.worker import VERIFIER_GROUP

ROOT = Path(__file__).resolve().parents[1]
BY_NAME = {p.name: p for p in PRINCIPALS}
STAGE_OF_FOLDER = {
    "router": "primerl-router",
    "engine_workers": "primerl-engine",
    "verifier_workers": "primerl-verifier",
    "learners": "primerl-learner",
    "archiver": "primerl-archiver",
    "producers": "primerl-producer",
}
TOPIC_CONSTANTS = {name: t.name for name, t in vars(topics).items() if isinstance(t, topics.Topic)}


def test_every_topic_is_written_and_read_by_someone_and_no_unknown_topic_is_granted() -> None:
    assert set(TOPIC_CONSTANTS.values()) == set(topics.TOPICS)
    for name in topics.TOPICS:
        assert any(name in p.writes for p in PRINCIPALS), f"{name}: no principal may write it"
        assert any(name in p.reads for p in PRINCIPALS), f"{name}: no principal may read it"
    for p in PRINCIPALS:
        assert set(p.reads) | set(p.writes) <= set(topics.TOPICS), p.name
        if p.name not in ("primerl-producer", "primerl-operator"):
            assert topics.DLQ.name in p.writes, f"{p.name} dead-letters like every stage"


def test_each_stage_folder_touches_only_topics_of_its_principal() -> None:
    for folder, principal in STAGE_OF_FOLDER.items():
        allowed = set(BY_NAME[principal].reads) | set(BY_NAME[principal].writes)
        for path in (ROOT / folder).rglob("*.py"):
            used = {n.id for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Name)}
            for const in used & set(TOPIC_CONSTANTS):
                assert TOPIC_CONSTANTS[const] in allowed, f"{path.relative_to(ROOT)} uses {const}; not in {principal}"


def test_every_consumer_group_of_the_code_is_granted() -> None:
    granted = {g for p in PRINCIPALS for g in p.groups}

    def covered(group: str) -> bool:
        return group in granted or any(g.endswith("-") and group.startswith(g) for g in granted)

    for group in (ROUTER_GROUP, ENGINE_GROUP, DEFERRAL_GROUP, VERIFIER_GROUP, ARCHIVER_GROUP, "learner-run1"):
        assert covered(group), group
    # groups built from a literal prefix anywhere in the code (f"learner-{run}", f"observer-{...}")
    for path in [*ROOT.glob("*/*.py")]:
        if path.parts[-2] in ("tests", "perf", "scripts", "docs"):
            continue
        for m in re.finditer(r"consumer_kwargs\([^,]+, f\"([a-z-]+-)\{", path.read_text()):
            assert covered(m.group(1) + "x"), f"{path.relative_to(ROOT)}: group {m.group(1)}..."


def _ledger_stages() -> set[str]:
    """The leading literal of every Ledger(redis, STAGE) call in the shipped code."""
    found = set()
    for path in ROOT.glob("*/*.py"):
        if path.parts[-2] in ("tests", "perf", "scripts"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "Ledger" and len(node.args) >= 2:
                arg = node.args[1]
                if isinstance(arg, ast.Constant):
                    found.add(str(arg.value))
                elif isinstance(arg, ast.JoinedStr) and isinstance(arg.values[0], ast.Constant):
                    found.add(str(arg.values[0].value))
    return found


def test_every_redis_key_the_code_builds_is_granted_to_someone() -> None:
    stages = _ledger_stages()
    assert {"engine", "verifier:", "policy-dead-letters"} <= stages  # the scan sees the three ledgers
    built = [
        keys.registry("engine", "w1"),
        keys.held_blocks("w1"),
        keys.pending_blocks("w1"),
        keys.load("w1"),
        keys.sessions("w1"),
        keys.policy_version("run1"),
        keys.resume_hint("req1"),
        *(keys.ledger_prefix(s.rstrip(":")) + "msg1" for s in stages),
    ]
    writable = [k for p in PRINCIPALS for k in p.redis_write]
    for key in built:
        assert any(key.startswith(prefix) for prefix in writable), f"{key}: nobody may write it"
    for p in PRINCIPALS:
        for prefix in (*p.redis_read, *p.redis_write):
            assert prefix.startswith("primerl:") and prefix.endswith(":"), (p.name, prefix)


def test_deploy_acl_files_are_rendered_from_the_map() -> None:
    out = ROOT / "deploy" / "acl"
    assert (out / KAFKA_FILE).read_text() == render_kafka(), "run: python scripts/render_acls.py"
    assert (out / REDIS_FILE).read_text() == render_redis(), "run: python scripts/render_acls.py"
    for p in PRINCIPALS:
        assert f"User:{p.name} " in render_kafka()


@pytest.mark.integration
async def test_the_redis_acl_file_loads_and_lets_each_stage_do_its_own_work_only(tmp_path: Path) -> None:
    """The rendered ACL file on a real redis-server: the engine heartbeats (Lua, MULTI), the router
    sees it and adds a route, the learner sets its version, and each is refused outside its map."""
    text = render_redis()
    for p in PRINCIPALS:
        text = text.replace("${" + password_var(p) + "}", f"pw-{p.name}")
    acl = tmp_path / "users.acl"
    acl.write_text(text)
    proc, rec = start_redis(tmp_path, acl_file=acl)

    def login(user: str) -> Redis:
        return Redis.from_url(f"redis://127.0.0.1:{rec.port}/0", username=user, password=f"pw-{user}")

    users = ("primerl-engine", "primerl-router", "primerl-learner", "primerl-verifier")
    engine, router, learner, verifier = (login(u) for u in users)
    try:
        await PrefixIndex(engine, 5.0).heartbeat(WorkerInfo(worker_id="w1", partitions=[0]), HeldBlocks(), True)
        async with Ledger(engine, "engine").claim("m1") as mine:
            assert mine
        index = PrefixIndex(router, 5.0)
        assert [w.worker_id for w in await index.live_workers()] == ["w1"]
        await index.add_route("w1", ["h1"], 10.0, 1.0, 60.0)
        await learner.set(keys.policy_version("run1"), 3)
        async with Ledger(verifier, "verifier:v:1").claim("m1") as mine:
            assert mine
        for client, key in ((router, keys.registry("engine", "w1")), (learner, keys.load("w1")), (verifier, "other")):
            with pytest.raises(NoPermissionError):
                await client.set(key, "x")
        with pytest.raises(NoPermissionError):
            await engine.flushall()
        with pytest.raises(AuthenticationError):
            await Redis.from_url(f"redis://127.0.0.1:{rec.port}/0").ping()
    finally:
        for c in (engine, router, learner, verifier):
            await c.aclose()
        stop_process(rec)
