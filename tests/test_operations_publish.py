"""`primerl publish`: prompt files (JSONL, CSV, Parquet) with bad rows, through the real broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from plumbing.config import Config
from producers.prompt_files import BadRow, FileDefaults, read_prompt_file
from producers.publish import publish_requests
from schemas import GrammarKind, SamplingParams
from tests.ops_helpers import prompts_of_run

ROOT = Path(__file__).resolve().parents[1]

GOOD_AND_BAD = [
    {"messages": [{"role": "user", "content": "What is 2 + 3?"}], "answer": "5", "task": "math"},
    "this line is not JSON",
    {"prompt": "Say hi", "verifier": "exact", "reference": "hi", "session_id": "s-1", "turn_index": 2},
    {"prompt": "both", "messages": [{"role": "user", "content": "x"}]},
    {"prompt": "Pick one", "grammar": {"kind": "choice", "spec": '["a", "b"]'}, "group_size": 2},
    {"prompt": "typo", "refrence": "1"},
    {"prompt": "bad grammar", "grammar": {"kind": "no-such-kind"}},
]


def _write_jsonl(path: Path, rows: list[object]) -> None:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


def test_rows_are_validated_with_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    _write_jsonl(path, GOOD_AND_BAD)
    defaults = FileDefaults(run_id="r", task="math_format", group_size=4, sampling=SamplingParams(max_tokens=16))
    reqs, errors = read_prompt_file(path, defaults)
    assert [int(r.metadata["source_line"]) for r in reqs] == [1, 3, 5]
    assert [e.line for e in errors] == [2, 4, 6, 7]
    reasons = {e.line: e.reason for e in errors}
    assert "not valid JSON" in reasons[2]
    assert "exactly one of" in reasons[4]
    assert "refrence" in reasons[6]
    assert "no-such-kind" in reasons[7] or "kind" in reasons[7]
    chat, plain, choice = reqs
    assert chat.messages and chat.reference == "5" and chat.task == "math" and chat.group_size == 4
    assert plain.text == "Say hi" and plain.task == "exact" and plain.session_id == "s-1" and plain.turn_index == 2
    assert plain.routing_key() == b"s-1"
    assert (
        choice.grammar
        and choice.grammar.kind is GrammarKind.CHOICE
        and choice.group_size == 2
        and choice.task == "math_format"
    )
    assert all(r.run_id == "r" and r.sampling.max_tokens == 16 and r.group_id == r.id for r in reqs)
    with pytest.raises(BadRow) as err:
        read_prompt_file(path, defaults, strict=True)
    assert err.value.error.line == 2


def test_csv_and_parquet_rows(tmp_path: Path) -> None:
    csv_path = tmp_path / "p.csv"
    csv_path.write_text(
        "prompt,answer,task,grammar_kind,grammar_spec,messages\n"
        '"What is 1+1?",2,math,regex,"<answer>[0-9]+</answer>",\n'
        ',,math,,,"[{""role"": ""user"", ""content"": ""hi""}]"\n'
        ',,math,,,"not json"\n'
        '"x",1,math,,,,extra\n'
    )
    reqs, errors = read_prompt_file(csv_path, FileDefaults(run_id="c"))
    assert len(reqs) == 2 and reqs[0].grammar and reqs[0].grammar.kind is GrammarKind.REGEX and reqs[0].reference == "2"
    assert reqs[1].messages and reqs[1].messages[0].content == "hi"
    assert [e.line for e in errors] == [4, 5]
    pq_path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "answer": "1"}, {"prompt": None, "answer": "2"}]), pq_path)
    reqs, errors = read_prompt_file(pq_path, FileDefaults(run_id="p"))
    assert [r.text for r in reqs] == ["a"] and [e.line for e in errors] == [2]


async def test_publish_delivers_the_good_rows_once_each(cfg: Config, tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    _write_jsonl(path, GOOD_AND_BAD * 5)
    run_id = f"pub-{uuid.uuid4().hex[:8]}"
    reqs, errors = read_prompt_file(path, FileDefaults(run_id=run_id, task="math", group_size=2))
    report = await publish_requests(cfg, reqs, rate=100.0, progress=False)
    assert report.requests == 15 and len(errors) == 20
    assert report.samples == sum(r.group_size for r in reqs)
    assert report.seconds >= 14 / 100  # the rate limit held
    seen = await prompts_of_run(cfg, run_id, 15)
    assert sorted(r.id for r in seen) == sorted(r.id for r in reqs)


def test_cli_reports_bad_lines_and_publishes_the_rest(cfg: Config, tmp_path: Path) -> None:
    import asyncio

    path = tmp_path / "p.jsonl"
    _write_jsonl(path, GOOD_AND_BAD)
    run_id = f"cli-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": cfg.bootstrap, "REDIS_URL": cfg.redis_url, "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "primerl",
        "publish",
        str(path),
        "--run-id",
        run_id,
        "--group-size",
        "4",
        "--task",
        "math",
        "--max-tokens",
        "16",
        "--rate",
        "50",
        "--state-dir",
        str(tmp_path / "state"),
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    for line in (2, 4, 6, 7):
        assert f"{path}:{line}: skipped" in out.stderr
    assert f"published 3 requests (10 samples) of run {run_id}" in out.stdout  # 4 + 4 + the choice row's own 2
    seen = asyncio.run(prompts_of_run(cfg, run_id, 3))
    assert len(seen) == 3
    strict = subprocess.run([*cmd, "--strict"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert strict.returncode == 1 and f"{path}:2:" in strict.stderr and "nothing published" in strict.stderr


async def test_a_json_completion_from_an_outside_client_is_scored(cfg: Config, tmp_path: Path) -> None:
    """The verifier takes JSON (kcat with a content-type header, no `kind` tag) like msgpack."""
    import asyncio

    import msgspec
    from prometheus_client import CollectorRegistry

    from plumbing.kafka import Publisher
    from plumbing.redis_client import connect_redis
    from plumbing.trust import Signer, generate_keypair
    from primerl.rewards_reader import RewardsReader
    from schemas import CONTENT_TYPE_HEADER, JSON
    from schemas.topics import COMPLETIONS
    from tests.reward_helpers import as_engine, make_completion
    from verifier_workers.rewards import build_registry, close_registry
    from verifier_workers.worker import VerifierWorker

    run_id = f"json-{uuid.uuid4().hex[:8]}"
    c = msgspec.structs.replace(make_completion("<answer>4</answer>", reference="4"), run_id=run_id, id=f"{run_id}/0")
    c = as_engine(c, cfg)  # an outside client needs an engine key too (custody.require_engine_signatures)
    body = msgspec.to_builtins(c)  # the signature travels base64-encoded
    body.pop("kind")
    priv, _ = generate_keypair(tmp_path / "keys", "json-key")
    fns = build_registry()
    redis = connect_redis(cfg)
    async with Publisher(cfg) as pub, RewardsReader(cfg, run_id) as reader:
        worker = VerifierWorker(cfg, fns, Signer.from_file(priv), pub, redis, CollectorRegistry())
        task = asyncio.create_task(worker.run())
        try:
            await pub.publish_raw(
                COMPLETIONS.name, json.dumps(body).encode(), key=b"g", headers=[(CONTENT_TYPE_HEADER, JSON.encode())]
            )
            rewards = await reader.wait_for(1, timeout_s=60)
        finally:
            worker.stop()
            await task
    await close_registry(fns)
    await redis.aclose()
    assert rewards[0].completion_id == c.id and rewards[0].scalar == 1.0
