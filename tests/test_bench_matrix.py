"""The pure parts of perf/bench_matrix.py: CSV columns, cell order, summaries, ratios, the scrape merge."""

from __future__ import annotations

import asyncio
import csv
import math
import random
from pathlib import Path

import msgspec
import pytest
from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from perf.bench_matrix import (
    COLUMNS,
    Cell,
    Row,
    Sample,
    acceptance,
    cell_order,
    cpu_rows,
    cpu_seconds,
    cpu_table,
    meets,
    model_max_len,
    parser,
    ratios,
    raw_drift,
    resolve,
    spec_counters,
    summarise,
)
from perf.common import write_csv
from perf.scrape import scrape
from perf.workload import Shape, Workload
from schemas import ChatMessage, GrammarKind, PromptRequest

RESEARCH_COLUMNS = "context,speculation,global_cache,tokens_per_s,ttfb_ms,p95_ms,cache_hit_rate".split(",")
EXTRA_COLUMNS = "stack,repeat,requests,ttfb_p95_ms,load_max_over_mean,acceptance_rate".split(",")


def _row(stack: str, context: int, repeat: int, tps: float, ttfb: float, p95: float, hit: float) -> Row:
    return Row(context, "off", "off", tps, ttfb, p95, hit, stack, repeat, 10, ttfb * 2, 1.0, float("nan"))


def test_csv_has_the_research_notes_columns_then_ours(tmp_path: Path) -> None:
    assert list(Row.__struct_fields__) == COLUMNS == RESEARCH_COLUMNS + EXTRA_COLUMNS
    path = tmp_path / "perf_results.csv"
    write_csv(path, [_row("baseline", 512, 0, 10.0, 100.0, 300.0, 0.5)])
    with open(path) as f:
        header, line = list(csv.reader(f))
    assert header == COLUMNS
    assert line[:3] == ["512", "off", "off"] and line[7] == "baseline" and line[-1] == "nan"


def test_cells_interleave_baseline_and_prime_per_context_after_the_raw_bound() -> None:
    cells = cell_order([512, 2048], repeats=2, raw=True)
    assert [(c.stack, c.context, c.repeat) for c in cells] == [
        ("raw", 512, 0),
        ("raw", 512, 1),
        ("raw", 2048, 0),
        ("raw", 2048, 1),
        ("baseline", 512, 0),
        ("prime", 512, 0),
        ("baseline", 512, 1),
        ("prime", 512, 1),
        ("baseline", 2048, 0),
        ("prime", 2048, 0),
        ("baseline", 2048, 1),
        ("prime", 2048, 1),
    ]
    # The stacks get the same text at one (context, repeat); one stack never sees a seed twice.
    seeds = {(c.stack, c.context, c.repeat): c.seed for c in cells}
    assert seeds["raw", 512, 1] == seeds["baseline", 512, 1] == seeds["prime", 512, 1]
    for stack in ("raw", "baseline", "prime"):
        mine = [c.seed for c in cells if c.stack == stack]
        assert len(set(mine)) == len(mine)
    assert [c.stack for c in cell_order([512], 1, raw=False)] == ["baseline", "prime"]
    # --raw-after: the raw cells once more at the end, repeats numbered on, the same text
    # (on engines started afresh, so still no engine sees a text twice).
    again = cell_order([512, 2048], repeats=2, raw=True, raw_after=True)
    assert again[: len(cells)] == cells
    assert [(c.stack, c.context, c.repeat) for c in again[len(cells) :]] == [
        ("raw", 512, 2),
        ("raw", 512, 3),
        ("raw", 2048, 2),
        ("raw", 2048, 3),
    ]
    assert [c.seed for c in again[len(cells) :]] == [c.seed for c in cells[:4]]
    assert cell_order([512], 1, raw=False, raw_after=True) == cell_order([512], 1, raw=False)


def test_raw_drift_compares_the_raw_cells_before_and_after_the_pipeline_cells() -> None:
    def raw(context: int, repeat: int, tps: float) -> Row:
        return Row(context, "on", "sticky", tps, 1.0, 1.0, 0.8, "raw", repeat, 40, 1.0, 1.0, 0.5)

    rows = [raw(2048, 0, 20.0), raw(2048, 1, 22.0), raw(2048, 2, 24.0), raw(2048, 3, 26.0), raw(512, 0, 40.0)]
    assert raw_drift(rows, repeats=2) == {2048: (21.0, 25.0)}  # 512 has no after-window: left out
    # The bound the ratios use is the mean over both windows.
    prime = msgspec.structs.replace(raw(2048, 0, 23.0), stack="prime")
    base = msgspec.structs.replace(raw(2048, 0, 11.5), stack="baseline")
    assert ratios([*rows, prime, base])[0].raw_fraction == pytest.approx(1.0)


def test_summary_of_a_cell() -> None:
    samples = [
        Sample(sent=0.0, first=0.1, done=1.0, tokens=10, prompt_tokens=100, cached_tokens=50, worker="a"),
        Sample(sent=0.0, first=0.3, done=2.0, tokens=10, prompt_tokens=100, cached_tokens=100, worker="a"),
        Sample(sent=1.0, first=1.2, done=4.0, tokens=20, prompt_tokens=200, cached_tokens=0, worker="b"),
    ]
    row = summarise(Cell("prime", 1024, 1, 7), samples, acceptance=0.5)
    assert (row.speculation, row.global_cache, row.stack, row.repeat, row.requests) == ("on", "on", "prime", 1, 3)
    assert row.tokens_per_s == pytest.approx(40 / 4.0)
    assert row.ttfb_ms == pytest.approx(200.0)  # median of 100, 200, 300
    assert row.ttfb_p95_ms == pytest.approx(300.0)
    assert row.p95_ms == pytest.approx(3000.0)  # end to end: 1000, 2000, 3000
    assert row.cache_hit_rate == pytest.approx(150 / 400)
    assert row.load_max_over_mean == pytest.approx(2 / 1.5)
    assert row.acceptance_rate == 0.5
    one_worker = summarise(Cell("baseline", 512, 0, 1), samples[:2], acceptance=float("nan"))
    assert one_worker.load_max_over_mean == pytest.approx(2.0)  # the idle worker counts
    assert one_worker.speculation == "off" and math.isnan(one_worker.acceptance_rate)
    assert summarise(Cell("raw", 512, 0, 1), [], float("nan")).requests == 0


def test_ratios_are_prime_over_baseline_of_means_over_repeats_and_pipelines_over_raw() -> None:
    rows = [
        _row("baseline", 2048, 0, 10.0, 1000.0, 4000.0, 0.6),
        _row("baseline", 2048, 1, 12.0, 1200.0, 4400.0, 0.7),
        _row("prime", 2048, 0, 16.0, 600.0, 3000.0, 0.8),
        _row("prime", 2048, 1, 17.0, 700.0, 3200.0, 0.8),
        _row("raw", 2048, 0, 20.0, 300.0, 1000.0, 0.9),
        _row("raw", 2048, 1, 16.0, 300.0, 1000.0, 0.9),
        _row("baseline", 512, 0, 30.0, 100.0, 400.0, 0.5),  # no prime cell at 512: no ratio
    ]
    [r] = ratios(rows)
    assert r.context == 2048
    assert r.tokens_per_s == pytest.approx(16.5 / 11.0)
    assert r.ttfb == pytest.approx(650 / 1100)
    assert r.p95 == pytest.approx(3100 / 4200)
    assert r.hit_rate == pytest.approx(0.8 / 0.65)
    assert (r.prime_hit_rate, r.baseline_hit_rate) == (pytest.approx(0.8), pytest.approx(0.65))
    assert r.raw_fraction == pytest.approx(16.5 / 18.0)
    assert r.baseline_raw_fraction == pytest.approx(11.0 / 18.0)
    assert meets(r) == {"tokens_per_s": True, "ttfb": True, "p95": True, "prime_hit_rate": True, "raw_fraction": True}
    [no_raw] = ratios([x for x in rows if x.stack != "raw"])
    assert math.isnan(no_raw.raw_fraction)
    assert not meets(no_raw)["raw_fraction"]


def test_acceptance_from_two_metrics_pages() -> None:
    page = (
        "# HELP primerl_spec_drafted_tokens Draft tokens proposed, by source\n"
        "# TYPE primerl_spec_drafted_tokens counter\n"
        'primerl_spec_drafted_tokens_total{source="forced"} 30.0\n'
        'primerl_spec_drafted_tokens_total{source="ngram"} 10.0\n'
        "# HELP primerl_spec_accepted_tokens Draft tokens accepted, by source\n"
        "# TYPE primerl_spec_accepted_tokens counter\n"
        'primerl_spec_accepted_tokens_total{source="forced"} 28.0\n'
        'primerl_spec_accepted_tokens_total{source="ngram"} 2.0\n'
    )
    assert spec_counters(page) == (40.0, 30.0)
    assert acceptance((10.0, 5.0), (40.0, 30.0)) == pytest.approx(25 / 30)
    assert math.isnan(acceptance((40.0, 30.0), (40.0, 30.0)))


def test_the_routing_only_ablation_turns_speculation_off_in_prime_and_raw_only() -> None:
    from perf.bench_matrix import specs_of

    default, ablation = specs_of(parser().parse_args([])), specs_of(parser().parse_args(["--prime-speculation", "off"]))
    assert default["prime"].speculation and default["raw"].speculation and not default["baseline"].speculation
    assert not ablation["prime"].speculation and not ablation["raw"].speculation
    assert ablation["prime"].policy == "cache_aware" and ablation["baseline"] == default["baseline"]
    sample = Sample(sent=0.0, first=0.1, done=1.0, tokens=10, prompt_tokens=100, cached_tokens=50, worker="a")
    row = summarise(Cell("prime", 1024, 0, 7), [sample], float("nan"), spec=ablation["prime"])
    assert (row.speculation, row.global_cache) == ("off", "on")


def test_smoke_and_full_defaults() -> None:
    smoke = resolve(parser().parse_args(["--smoke"]))
    assert (smoke.contexts, smoke.repeats) == ([512, 1024], 1)
    full = resolve(parser().parse_args([]))
    assert (full.contexts, full.repeats, full.sessions) == ([512, 1024, 2048, 4096, 8192], 2, 4)
    assert resolve(parser().parse_args(["--smoke", "--contexts", "2048"])).contexts == [2048]


def test_workload_sends_sessions_that_extend_their_context_and_groups_of_separate_requests() -> None:
    shape = Shape(256, sessions=2, turns=3, groups=2, group_size=4, max_tokens=8, structured_share=0.5, tasks=True)
    sent: list[PromptRequest] = []

    async def send(req: PromptRequest) -> str:
        sent.append(req)
        await asyncio.sleep(random.random() / 1000)
        return "answer"

    asyncio.run(Workload(shape, "r", seed=3).run(send))
    assert len(sent) == shape.requests == 2 * 3 + 2 * 4
    sessions = {r.session_id for r in sent if r.session_id}
    assert len(sessions) == 2
    for sid in sessions:
        turns = sorted((r for r in sent if r.session_id == sid), key=lambda r: r.turn_index)
        assert [t.turn_index for t in turns] == [0, 1, 2]
        for prev, nxt in zip(turns, turns[1:], strict=False):
            assert nxt.messages is not None and prev.messages is not None
            assert nxt.messages[: len(prev.messages)] == prev.messages  # the context only grows
    groups = [r for r in sent if not r.session_id]
    assert {r.group_size for r in groups} == {1} and len({r.group_id for r in groups}) == 2
    systems = {r.messages[0].content for r in sent if r.messages}
    assert len(systems) == 1  # one shared system prompt
    structured = [r for r in sent if r.grammar is not None]
    assert structured and all(r.grammar and r.grammar.kind is GrammarKind.JSON_SCHEMA for r in structured)
    assert {r.task for r in structured} == {"format"}
    assert {r.task for r in sent if r.grammar is None} == {"regex"}


def test_sessions_get_the_turns_their_context_leaves_room_for() -> None:
    # At 8,192 tokens on SmolLM2's 8,192, six turns would overflow the last prompt (the engine
    # dead-letters it); the shape keeps as many as fit, and its estimate bounds the real prompts.
    from transformers import AutoTokenizer

    from engine_workers.requests import render_prompt
    from perf.workload import WORDS
    from plumbing.model_store import resolve_model

    assert model_max_len() == 8192
    assert Shape(4096, turns=6).fitted(8192).turns == 6
    assert Shape(8192, turns=6).fitted(8192).turns == 4
    assert Shape(8192, turns=1).fitted(8192).turns == 1
    tok = AutoTokenizer.from_pretrained(resolve_model(None))
    for turns in (4, 5):
        shape = Shape(8192, sessions=1, turns=turns, groups=1, group_size=1, structured_share=1.0, tasks=True)
        sent: list[PromptRequest] = []

        async def send(req: PromptRequest, sent: list[PromptRequest] = sent) -> str:
            sent.append(req)
            return " ".join(random.choice(WORDS) for _ in range(32))  # a full answer

        asyncio.run(Workload(shape, "r", seed=5).run(send))
        longest = max(len(render_prompt(r, tok)[1]) for r in sent)
        assert longest + shape.max_tokens <= shape.last_turn_tokens(turns), (turns, longest)
        assert (longest + shape.max_tokens <= 8192) == (turns == 4)  # five turns of JSON tool calls would not fit


def test_scrape_merges_processes_under_one_family_with_a_process_label() -> None:
    servers = []
    for value in (3, 5):
        reg = CollectorRegistry()
        Counter("primerl_demo_things", "Things", registry=reg).inc(value)
        servers.append(start_http_server(0, addr="127.0.0.1", registry=reg)[0])
    try:
        text = asyncio.run(
            scrape({f"p{i}": f"http://127.0.0.1:{s.server_port}/metrics" for i, s in enumerate(servers)})
        )
    finally:
        for s in servers:
            s.shutdown()
    assert text.count("# TYPE primerl_demo_things_total counter") == 1
    [fam] = [f for f in text_string_to_metric_families(text) if f.name == "primerl_demo_things"]
    totals = {s.labels["process"]: s.value for s in fam.samples if s.name.endswith("_total")}
    assert totals == {"p0": 3.0, "p1": 5.0}


def test_cpu_accounting_counts_a_process_tree_or_the_process_alone() -> None:
    import os
    import subprocess
    import sys

    # A child that burns CPU, then waits to be measured: counted in the tree, not alone.
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
            "print(1, flush=True)\ntime.sleep(30)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == b"1"
        t = cpu_seconds({"tree": (os.getpid(), True), "alone": (os.getpid(), False)})
        assert t["tree"] - t["alone"] >= 0.3
    finally:
        child.kill()
        child.wait()
    cell = Cell("prime", 2048, 0, 1)
    rows = cpu_rows(cell, {"a": 1.0, "b": 0.0}, {"a": 3.0, "b": 0.5}, wall_s=2.0, cores=2)
    assert [(r.process, r.cpu_s, r.core_share) for r in rows] == [("a", 2.0, 0.5), ("b", 0.5, 0.125)]
    assert "50.0%" in cpu_table(rows) and "12.5%" in cpu_table(rows)


class _View:
    def __init__(self) -> None:
        self.finals: dict[int, object] = {}
        self.rewards: dict[int, object] = {}
        self.dead: dict[int, str] = {}
        self.first_chunk_at = self.final_at = self.reward_at = 0.0


class _Final:
    text, token_ids, prompt_tokens, cached_prompt_tokens, worker_id = "answer", [1, 2, 3], 10, 4, "w0"


class _Observer:
    def __init__(self) -> None:
        self.requests: dict[str, _View] = {}


class _Publisher:
    def __init__(self, observer: _Observer) -> None:
        self.observer = observer
        self.sent: list[PromptRequest] = []

    async def publish(self, topic: str, req: PromptRequest, key: bytes) -> None:
        self.sent.append(req)
        self.observer.requests[req.id] = _View()


def _pipeline(turn_after: str) -> tuple[object, _Observer, _Publisher]:
    from perf.bench_matrix import STACKS, PipelineSet

    args = resolve(parser().parse_args(["--smoke", "--turn-after", turn_after]))
    s = PipelineSet("prime", STACKS["prime"], Path("/nonexistent"), args)
    observer = _Observer()
    s.observer, s.publisher = observer, _Publisher(observer)
    return s, observer, s.publisher


@pytest.mark.parametrize("turn_after", ["completion", "reward"])
def test_a_turn_returns_on_its_completion_and_its_sample_is_recorded_on_its_reward(turn_after: str) -> None:
    from perf.bench_matrix import BenchMetrics, CellRun

    async def go() -> None:
        s, observer, publisher = _pipeline(turn_after)
        cr = CellRun(Cell("prime", 512, 0, 0), Shape(512, sessions=1, turns=1, groups=0), BenchMetrics(), 30)
        req = PromptRequest(run_id="x", messages=[ChatMessage("user", "p")], session_id="s", turn_index=2)
        task = asyncio.ensure_future(s.send(req, cr))  # type: ignore[attr-defined]
        while not publisher.sent:
            await asyncio.sleep(0.01)
        view = observer.requests[req.id]
        view.finals[0], view.final_at, view.first_chunk_at = _Final(), 5.0, 4.0
        await asyncio.sleep(0.2)
        # On the completion the env hub's way; waiting for the reward the old way.
        assert task.done() is (turn_after == "completion")
        assert cr.samples == []  # no reward yet: nothing recorded
        view.rewards[0], view.reward_at = object(), 6.0
        assert await asyncio.wait_for(task, 5) == "answer"
        await asyncio.wait_for(cr.settle(), 5)
        assert [(x.first, x.final, x.done, x.kind, x.tokens) for x in cr.samples] == [(4.0, 5.0, 6.0, "turn 2", 3)]
        cr.bar.close()

    asyncio.run(go())


def test_a_dead_letter_after_the_completion_fails_the_request_once_at_settle() -> None:
    from perf.bench_matrix import BenchMetrics, CellRun

    async def go() -> None:
        s, observer, publisher = _pipeline("completion")
        cr = CellRun(Cell("prime", 512, 0, 0), Shape(512, sessions=1, turns=1, groups=0), BenchMetrics(), 30)
        req = PromptRequest(run_id="x", messages=[ChatMessage("user", "p")], group_id="g")
        task = asyncio.ensure_future(s.send(req, cr))  # type: ignore[attr-defined]
        while not publisher.sent:
            await asyncio.sleep(0.01)
        observer.requests[req.id].finals[0] = _Final()
        assert await asyncio.wait_for(task, 5) == "answer"
        observer.requests[req.id].dead[0] = "verifier: BadSignature: forged"
        await asyncio.wait_for(cr.settle(), 5)
        assert cr.failed == 1 and cr.samples == [] and not cr.pending
        cr.bar.close()

    asyncio.run(go())


def test_request_rows_time_each_request_from_the_cells_start() -> None:
    from perf.bench_matrix import request_rows

    samples = [
        Sample(
            sent=12.0,
            first=13.0,
            done=16.0,
            tokens=5,
            prompt_tokens=100,
            cached_tokens=90,
            worker="b",
            final=15.0,
            kind="turn 1",
        ),  # fmt: skip
        Sample(
            sent=10.0, first=11.0, done=12.0, tokens=5, prompt_tokens=100, cached_tokens=0, worker="a", kind="group"
        ),  # fmt: skip
    ]
    rows = request_rows(Cell("raw", 2048, 1, 0), samples)
    assert [(r.kind, r.sent_s, r.first_s, r.final_s, r.done_s) for r in rows] == [
        ("group", 0.0, 1.0, 2.0, 2.0),  # raw: no separate completion time, the last token's
        ("turn 1", 2.0, 3.0, 5.0, 6.0),
    ]


def test_renice_sets_every_process_of_the_set_and_its_children() -> None:
    import subprocess
    import sys

    import psutil

    from perf.bench_matrix import STACKS, PipelineSet

    parent = subprocess.Popen([sys.executable, "-c", "import subprocess,sys,time\n"
                               "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                               "print(1, flush=True)\ntime.sleep(60)"], stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert parent.stdout is not None and parent.stdout.readline().strip() == b"1"

        class _Stage:
            proc = parent

        s = PipelineSet("baseline", STACKS["baseline"], Path("/nonexistent"), resolve(parser().parse_args([])))
        s.stages = {"engine-0": _Stage()}  # type: ignore[dict-item]
        assert s.renice(7)
        procs = [psutil.Process(parent.pid), *psutil.Process(parent.pid).children(recursive=True)]
        assert len(procs) == 2 and [p.nice() for p in procs] == [7, 7]
    finally:
        for p in psutil.Process(parent.pid).children(recursive=True):
            p.kill()
        parent.kill()
        parent.wait()
