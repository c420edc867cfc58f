"""The cost-model sweep (perf/cost_model_sweep.py): its cells, ratios, pick and outputs, at small sizes."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import msgspec

from perf import cost_model_sweep as cms
from perf.common import write_csv
from perf.fleet_sim import EngineCosts
from perf.workload import Shape

COSTS = EngineCosts(
    step_fixed_s=0.05,
    decode_per_seq_s=0.004,
    prefill_per_token_s=0.003,
    attention_per_ktoken_s=0.001,
    request_overhead_s=0.1,
)
# One shared system prompt and a burst of groups: where the weights matter.
SHAPE = Shape(context=1024, sessions=1, turns=2, groups=2, group_size=4, max_tokens=8)


def test_sweep_cells_ratios_and_latency_weight_spreads_a_burst(tmp_path: Path) -> None:
    rows = cms.sweep({"fitted": COSTS}, SHAPE, [4], [1024], [0.0, 0.5, 1.0], [1.0], progress=False)
    assert len(rows) == 1 + 3  # round-robin, then each weight pair
    rr = rows[0]
    assert rr.policy == "round_robin" and math.isnan(rr.latency_weight)
    assert rr.tokens_per_s_ratio == rr.ttfb_p50_ratio == 1.0
    by_lw = {r.latency_weight: r for r in rows[1:]}
    for r in by_lw.values():
        assert r.tokens_per_s_ratio == r.tokens_per_s / rr.tokens_per_s
        assert r.ttfb_p95_ratio == r.ttfb_p95_ms / rr.ttfb_p95_ms
        assert r.baseline_hit_rate == rr.cache_hit_rate
    # Pure affinity piles every request onto the engine that holds the system prompt; pure TTFT spreads them.
    assert by_lw[0.0].load_max_over_mean == 4
    assert by_lw[1.0].load_max_over_mean < by_lw[0.0].load_max_over_mean
    assert by_lw[0.0].cache_hit_rate > by_lw[1.0].cache_hit_rate

    write_csv(tmp_path / "sweep.csv", rows)
    with open(tmp_path / "sweep.csv") as f:
        header = next(csv.reader(f))
    for col in ("latency_weight", "decode_token_cost", "tokens_per_s", "ttfb_mean_ms", "ttfb_p95_ms", "e2e_p95_ms"):
        assert col in header
    for col in ("cache_hit_rate", "tokens_per_s_ratio", "ttfb_mean_ratio", "ttfb_p50_ratio", "e2e_p95_ratio"):
        assert col in header


def _row(lw: float, dc: float, *, hit: float, tok: float, p50: float, e2e: float, w: int = 2) -> cms.SweepRow:
    return cms.SweepRow(
        calibration="fitted",
        workers=w,
        context=2048,
        policy="cache_aware",
        latency_weight=lw,
        decode_token_cost=dc,
        requests=32,
        tokens_per_s=tok,
        ttfb_mean_ms=p50,
        ttfb_p50_ms=p50,
        ttfb_p95_ms=p50,
        e2e_p95_ms=e2e,
        cache_hit_rate=hit,
        load_max_over_mean=1.0,
        tokens_per_s_ratio=tok,
        ttfb_mean_ratio=p50,
        ttfb_p50_ratio=p50,
        ttfb_p95_ratio=p50,
        e2e_p95_ratio=e2e,
        baseline_hit_rate=0.7,
    )


def test_recommend_keeps_hit_rate_tokens_and_the_guard() -> None:
    rows = [
        _row(0.5, 1.0, hit=0.80, tok=1.2, p50=1.0, e2e=0.8),  # the default
        _row(0.0, 1.0, hit=0.70, tok=1.2, p50=0.5, e2e=0.8),  # faster, but loses hit rate
        _row(0.1, 1.0, hit=0.80, tok=1.0, p50=0.6, e2e=0.8),  # faster, but loses tokens/s
        _row(0.2, 1.0, hit=0.80, tok=1.2, p50=0.7, e2e=1.0),  # faster, but a worse e2e p95
        _row(0.3, 1.0, hit=0.80, tok=1.2, p50=0.9, e2e=0.8),  # faster and nothing lost
    ]
    guarded = cms.recommend(rows, default=(0.5, 1.0))
    assert (guarded.latency_weight, guarded.ttfb_p50_geomean, guarded.default_ttfb_p50_geomean) == (0.3, 0.9, 1.0)
    assert guarded.eligible == 2
    assert cms.recommend(rows, default=(0.5, 1.0), guard=()).latency_weight == 0.2
    # Every (W, context) must pass: a pair that loses hit rate at W=8 only is out.
    rows += [_row(lw, 1.0, hit=0.8, tok=1.2, p50=1.0, e2e=0.8, w=8) for lw in (0.5, 0.0, 0.1, 0.2)]
    rows.append(_row(0.3, 1.0, hit=0.6, tok=1.2, p50=1.0, e2e=0.8, w=8))
    assert cms.recommend(rows, default=(0.5, 1.0)).latency_weight == 0.5


def test_perturbations_scale_one_cost_each() -> None:
    cals = cms.perturbations(COSTS, 0.25)
    assert len(cals) == 1 + 2 * len(cms.PERTURBED) and cals["fitted"] == COSTS
    assert cals["step_fixed_s x1.25"] == msgspec.structs.replace(COSTS, step_fixed_s=COSTS.step_fixed_s * 1.25)
    assert cms.perturbations(COSTS, 0) == {"fitted": COSTS}


def test_direction_check_reads_prime_and_baseline_only(tmp_path: Path) -> None:
    path = tmp_path / "perf_results.csv"
    header = (
        "context,speculation,global_cache,tokens_per_s,ttfb_ms,p95_ms,cache_hit_rate,stack,repeat,requests,"
        "ttfb_p95_ms,load_max_over_mean,acceptance_rate"
    )
    path.write_text(
        header + "\n"
        "2048,off,off,10,1000,3000,0.6,baseline,0,32,2000,1.0,0\n"
        "2048,on,on,20,2000,3000,0.9,prime,0,32,1000,1.0,0.4\n"
        "2048,on,sticky,90,100,200,0.5,raw,0,32,150,1.0,0.7\n"
        "1024,off,off,10,1000,3000,0.6,baseline,0,32,2000,1.0,0\n"
        "1024,on,on,20,2000,3000,0.9,prime,0,32,1000,1.0,0.4\n"
    )
    small = Shape(context=1024, sessions=1, turns=2, groups=1, group_size=4, max_tokens=8)
    rows = {r.metric: r for r in cms.direction_check(COSTS, small, [path, tmp_path / "missing.csv"])}
    assert set(rows) == {"tokens_per_s", "ttfb_p50_ms", "ttfb_p95_ms", "e2e_p95_ms"}  # 2048 only (>= 2048)
    assert rows["tokens_per_s"].real_ratio == 2.0 and rows["ttfb_p50_ms"].real_ratio == 2.0  # raw left out
    assert rows["ttfb_p95_ms"].real_ratio == 0.5 and rows["e2e_p95_ms"].real_ratio == 1.0
    for r in rows.values():
        same_side = (r.real_ratio - 1) * (r.simulated_ratio - 1) > 0
        both_flat = abs(r.real_ratio - 1) < 0.05 and abs(r.simulated_ratio - 1) < 0.05
        assert r.agree == ("yes" if same_side or both_flat else "no")
