"""The fleet simulation (perf/fleet_sim.py): determinism, routing and cache properties, calibration."""

from __future__ import annotations

import math
from pathlib import Path

import msgspec
import pytest

from perf import fleet_sim
from perf.fleet_sim import (
    CostSamples,
    DecodeSample,
    EngineCosts,
    PrefillSample,
    RealCell,
    calibrate,
    calibrate_from_samples,
    fit_loss,
    load_costs,
    load_perf_results,
    make_workload,
    run_cell,
    save_costs,
    simulate,
    step_seconds,
    summarise,
)
from perf.workload import Shape

COSTS = EngineCosts(
    step_fixed_s=0.05,
    decode_per_seq_s=0.004,
    prefill_per_token_s=0.003,
    attention_per_ktoken_s=0.001,
    request_overhead_s=0.1,
)
BS = COSTS.block_size


def test_same_seed_same_result_other_seed_other_tokens() -> None:
    shape = Shape(context=1024)
    a = run_cell(COSTS, shape, 4, "cache_aware", seed=3)
    b = run_cell(COSTS, shape, 4, "cache_aware", seed=3)
    assert a == b
    w3, w4 = make_workload(shape, BS, 3), make_workload(shape, BS, 4)
    assert w3.groups[0][0].prompt_hashes != w4.groups[0][0].prompt_hashes


def test_cache_aware_keeps_a_session_on_one_engine_and_it_hits_round_robin_does_not() -> None:
    shape = Shape(context=2048, sessions=1, turns=5, groups=0)
    wl = make_workload(shape, BS, 0)
    turns = sorted(simulate(COSTS, wl, 4, "cache_aware"), key=lambda r: r.turn)
    assert len({r.engine for r in turns}) == 1
    assert turns[0].cached_tokens == 0
    for prev, cur in zip(turns, turns[1:], strict=False):
        # The previous prompt's full blocks at least (its answer's blocks too where full).
        assert cur.cached_tokens >= prev.prompt_tokens // BS * BS
    rr = sorted(simulate(COSTS, wl, 4, "round_robin"), key=lambda r: r.turn)
    assert len({r.engine for r in rr}) == 4
    assert all(r.cached_tokens == 0 for r in rr[1:4])  # a cold engine each turn until the rotation comes back


def test_round_robin_hit_rate_of_a_group_falls_as_engines_grow() -> None:
    wl = make_workload(Shape(context=2048, sessions=0, groups=1, group_size=8), BS, 0)
    hit = {
        w: summarise(simulate(COSTS, wl, w, "round_robin"), w, 2048, "round_robin").cache_hit_rate for w in (1, 2, 4, 8)
    }
    assert hit[1] > hit[2] > hit[4] >= hit[8]
    assert hit[8] == 0  # one sample per engine, all cold
    aware = summarise(simulate(COSTS, wl, 8, "cache_aware"), 8, 2048, "cache_aware").cache_hit_rate
    assert aware > 0.5 > hit[8]


def test_a_small_kv_cache_hits_less_than_an_unbounded_one() -> None:
    shape = Shape(context=2048)
    wl = make_workload(shape, BS, 0)
    rate = {}
    for blocks in (20, 10**6):  # 20: a little more than the largest request's 16 blocks
        costs = msgspec.structs.replace(COSTS, kv_blocks=blocks)
        rate[blocks] = summarise(simulate(costs, wl, 2, "cache_aware"), 2, 2048, "cache_aware").cache_hit_rate
    assert rate[20] < rate[10**6] - 0.1
    with pytest.raises(ValueError, match="KV blocks"):
        simulate(msgspec.structs.replace(COSTS, kv_blocks=10), wl, 2, "cache_aware")


def test_cache_aware_routing_calls_the_real_cost_model(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = fleet_sim.choose

    def spy(*args: object, **kw: object) -> object:
        calls.append(args)
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(fleet_sim, "choose", spy)
    run_cell(COSTS, Shape(context=512), 2, "cache_aware", seed=0)
    assert len(calls) == 32


def test_costs_json_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "costs.json"
    save_costs(msgspec.structs.replace(COSTS, notes=("why",)), path)
    assert load_costs(path) == msgspec.structs.replace(COSTS, notes=("why",))


def test_direct_samples_recover_the_costs_that_made_them(tmp_path: Path) -> None:
    truth = msgspec.structs.replace(COSTS, prefill_fixed_s=0.02)
    prefill = []
    for n, p in ((256, 0), (1024, 0), (3000, 0), (512, 1024), (2048, 4096)):
        steps = math.ceil(n / truth.step_token_budget)
        t = step_seconds(truth, [], [(p, n)], 1) + (steps - 1) * truth.step_fixed_s
        prefill.append(PrefillSample(uncached_tokens=n, cached_tokens=p, seconds=t))
    decode = [
        DecodeSample(batch=b, context=c, seconds=step_seconds(truth, [c] * b, [], 0))
        for b, c in ((1, 512), (8, 1024), (16, 2048), (32, 256))
    ]
    samples = CostSamples(prefill=prefill, decode=decode, request_overhead_s=0.1)
    path = tmp_path / "samples.json"
    path.write_bytes(msgspec.json.encode(samples))
    fitted = load_costs(path)
    assert fitted == calibrate_from_samples(samples)
    for name in (
        "step_fixed_s",
        "decode_per_seq_s",
        "prefill_per_token_s",
        "attention_per_ktoken_s",
        "prefill_fixed_s",
    ):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-6), name


def test_calibration_on_simulated_cells_moves_towards_the_truth() -> None:
    shape = Shape(context=512)
    sim = run_cell(COSTS, shape, 2, "round_robin", seed=0)
    cell = RealCell(context=512, policy="round_robin", **{k: getattr(sim, k) for k in RealCell.__struct_fields__[2:]})
    start = msgspec.structs.replace(COSTS, step_fixed_s=0.05, decode_per_seq_s=0.005, prefill_per_token_s=0.005)
    before = fit_loss(start, [cell], shape, 0)
    fitted, after = calibrate([cell], base=start, shape=shape, iters=30)
    assert after < 0.1 * before
    assert fitted.prefill_per_token_s == pytest.approx(COSTS.prefill_per_token_s, rel=0.3)


def test_perf_results_cells_average_repeats_and_map_stacks(tmp_path: Path) -> None:
    path = tmp_path / "perf_results.csv"
    header = (
        "context,speculation,global_cache,tokens_per_s,ttfb_ms,p95_ms,cache_hit_rate,stack,repeat,requests,"
        "ttfb_p95_ms,load_max_over_mean,acceptance_rate"
    )
    path.write_text(
        header + "\n"
        "2048,off,off,10,1000,3000,0.6,baseline,0,32,2000,1.0,0\n"
        "2048,off,off,20,3000,5000,0.8,baseline,1,32,4000,1.5,0\n"
        "2048,on,on,30,500,900,0.9,prime,0,32,700,1.25,0.4\n"
        "2048,on,sticky,90,100,200,0.5,raw,0,32,150,1.0,0.7\n"
    )
    cells = {c.policy: c for c in load_perf_results(path)}
    assert cells["round_robin"].tokens_per_s == 15 and cells["round_robin"].ttfb_p50_ms == 2000
    assert cells["round_robin"].e2e_p95_ms == 4000 and cells["round_robin"].ttfb_p95_ms == 3000
    assert cells["cache_aware"].cache_hit_rate == 0.9 and cells["cache_aware"].tokens_per_s == 30  # raw left out
