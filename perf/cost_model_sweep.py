"""The cost model's weights, by simulation: routing.latency_weight x routing.decode_token_cost.

    python -m perf.cost_model_sweep            # make cost-sweep; ~3 min on one core (--perturb 0: ~25 s)

Runs perf/fleet_sim.py's model (the real `router.cost_model.choose`, the calibration of
artifacts/fleet_costs.json, the bench's workload shape: 4 sessions of 4 turns and 2
groups of 8 per two engines, 32 tokens each; 32 requests at W=2, 128 at W=8, not shrunk)
with cache-aware routing at every (latency_weight, decode_token_cost) of the grid, and
round-robin once per (W, context) with the same seed; every cell's ratios are to that
round-robin cell. The seed only changes token ids (the hashes), not the timings: one
seed is all there is. Default grid: latency_weight 0 to 1 by 0.05 (the coarse grid
0/0.25/0.5/0.75/1 misses where the behaviour changes: between 0.05 and 0.25, and
between 0.65 and 0.95), decode_token_cost 0.25/0.5/1/2/4 (4: it matters at all only
from there), W = 2 (the real machine) and 8, contexts 2048 and 4096.

Error bars. The simulation's absolute error on the held-out prime cells is 25 % (tokens/s)
and 29 % (TTFB p50). Two more checks, both written:
- calibration: the grid again with each fitted step cost (step_fixed, prefill_per_token,
  attention_per_ktoken) scaled by 1 -/+ `--perturb` (0.25), rows `calibration` != "fitted";
- direction: at the default weights (0.5, 1.0) and W=2, the simulated cache-aware /
  round-robin ratios against the real prime / baseline ratios of the bench's CSVs
  (artifacts/perf_results.csv, perf_results_rerun.csv) at contexts >= 2,048. The real
  prime has speculation, the simulation has none: tokens/s and e2e ratios are expected
  to differ; TTFB (a prefill's time) much less so.

The recommendation (`recommend`): of the weights that keep, at every (W, context), the
hit rate within 0.01 of the default's and tokens/s within 2 %, the one with the lowest
geometric mean TTFB p50 ratio (the bench's TTFB target is a median).

Writes artifacts/cost_model_sweep.csv (one row per cell), cost_model_sweep_direction.csv
and cost_model_sweep.png (heatmaps over the grid, per W and context: tokens/s, TTFB p50
and p95 ratios, hit rate; default marked x, the guarded pick o, the TTFB-p50-only pick +).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import msgspec
from tqdm import tqdm

from perf.common import ARTIFACTS, write_csv
from perf.fleet_sim import (
    EngineCosts,
    Policy,
    RoutingKnobs,
    load_costs,
    load_perf_results,
    make_workload,
    scaled,
    simulate,
    summarise,
)
from perf.workload import Shape

LATENCY_WEIGHTS = tuple(round(i * 0.05, 2) for i in range(21))
DECODE_TOKEN_COSTS = (0.25, 0.5, 1.0, 2.0, 4.0)
DEFAULT = (RoutingKnobs.from_config().latency_weight, RoutingKnobs.from_config().decode_token_cost)
PERTURBED = ("step_fixed_s", "prefill_per_token_s", "attention_per_ktoken_s")
RATIO_METRICS = ("tokens_per_s", "ttfb_mean_ms", "ttfb_p50_ms", "ttfb_p95_ms", "e2e_p95_ms")


class SweepRow(msgspec.Struct, frozen=True, kw_only=True):
    """One simulated cell; the ratios are to round-robin at the same (calibration, W, context, seed)."""

    calibration: str  # "fitted", or e.g. "step_fixed_s x0.75"
    workers: int
    context: int
    policy: str
    latency_weight: float  # NaN for round_robin
    decode_token_cost: float  # NaN for round_robin
    requests: int
    tokens_per_s: float
    ttfb_mean_ms: float
    ttfb_p50_ms: float
    ttfb_p95_ms: float
    e2e_p95_ms: float
    cache_hit_rate: float
    load_max_over_mean: float
    tokens_per_s_ratio: float
    ttfb_mean_ratio: float
    ttfb_p50_ratio: float
    ttfb_p95_ratio: float
    e2e_p95_ratio: float
    baseline_hit_rate: float


class DirectionRow(msgspec.Struct, frozen=True, kw_only=True):
    """A real prime/baseline ratio against the simulated cache-aware/round-robin one (W=2, default weights)."""

    source: str
    context: int
    metric: str
    real_ratio: float
    simulated_ratio: float
    agree: str  # "yes": same side of 1 (or both within 5 % of it); "no" otherwise


class Recommendation(msgspec.Struct, frozen=True, kw_only=True):
    latency_weight: float
    decode_token_cost: float
    ttfb_p50_geomean: float  # geometric mean ratio to round-robin over the (W, context) cells
    default_ttfb_p50_geomean: float
    eligible: int  # weight pairs that passed the hit rate / tokens/s constraints


def run_knobs(
    costs: EngineCosts, shape: Shape, workers: int, policy: Policy, seed: int, knobs: RoutingKnobs | None
) -> dict[str, float]:
    """One cell's metrics (fleet_sim's, plus the TTFB mean the bench's CSV lacks)."""
    records = simulate(costs, make_workload(scaled(shape, workers), costs.block_size, seed), workers, policy, knobs)
    res = summarise(records, workers, shape.context, policy)
    ttfb_mean = sum(r.first_token_at - r.published_at for r in records) / len(records) * 1000
    return {
        "requests": res.requests,
        "tokens_per_s": res.tokens_per_s,
        "ttfb_mean_ms": ttfb_mean,
        "ttfb_p50_ms": res.ttfb_p50_ms,
        "ttfb_p95_ms": res.ttfb_p95_ms,
        "e2e_p95_ms": res.e2e_p95_ms,
        "cache_hit_rate": res.cache_hit_rate,
        "load_max_over_mean": res.load_max_over_mean,
    }


def _row(
    calibration: str, w: int, c: int, policy: str, lw: float, dc: float, m: dict[str, float], rr: dict[str, float]
) -> SweepRow:
    ratios = {k: m[k] / rr[k] if rr[k] else math.nan for k in RATIO_METRICS}
    return SweepRow(
        calibration=calibration,
        workers=w,
        context=c,
        policy=policy,
        latency_weight=lw,
        decode_token_cost=dc,
        requests=int(m["requests"]),
        tokens_per_s=m["tokens_per_s"],
        ttfb_mean_ms=m["ttfb_mean_ms"],
        ttfb_p50_ms=m["ttfb_p50_ms"],
        ttfb_p95_ms=m["ttfb_p95_ms"],
        e2e_p95_ms=m["e2e_p95_ms"],
        cache_hit_rate=m["cache_hit_rate"],
        load_max_over_mean=m["load_max_over_mean"],
        tokens_per_s_ratio=ratios["tokens_per_s"],
        ttfb_mean_ratio=ratios["ttfb_mean_ms"],
        ttfb_p50_ratio=ratios["ttfb_p50_ms"],
        ttfb_p95_ratio=ratios["ttfb_p95_ms"],
        e2e_p95_ratio=ratios["e2e_p95_ms"],
        baseline_hit_rate=rr["cache_hit_rate"],
    )


def sweep(
    calibrations: dict[str, EngineCosts],
    shape: Shape,
    workers: Sequence[int],
    contexts: Sequence[int],
    latency_weights: Sequence[float] = LATENCY_WEIGHTS,
    decode_token_costs: Sequence[float] = DECODE_TOKEN_COSTS,
    seed: int = 0,
    progress: bool = True,
) -> list[SweepRow]:
    """Round-robin, then cache-aware at every weight pair, per calibration, W and context."""
    base = RoutingKnobs.from_config()
    grid = [(lw, dc) for lw in latency_weights for dc in decode_token_costs]
    total = len(calibrations) * len(workers) * len(contexts) * (1 + len(grid))
    rows = []
    with tqdm(total=total, desc="cost-model sweep", unit="cell", disable=not progress) as bar:
        for name, costs in calibrations.items():
            for w in workers:
                for c in contexts:
                    cshape = dataclasses.replace(shape, context=c)
                    rr = run_knobs(costs, cshape, w, "round_robin", seed, None)
                    rows.append(_row(name, w, c, "round_robin", math.nan, math.nan, rr, rr))
                    bar.update()
                    for lw, dc in grid:
                        knobs = msgspec.structs.replace(base, latency_weight=lw, decode_token_cost=dc)
                        m = run_knobs(costs, cshape, w, "cache_aware", seed, knobs)
                        rows.append(_row(name, w, c, "cache_aware", lw, dc, m, rr))
                        bar.update()
    return rows


def perturbations(costs: EngineCosts, by: float) -> dict[str, EngineCosts]:
    """The fitted costs, and each of PERTURBED scaled by 1 - by and 1 + by (none when by is 0)."""
    out = {"fitted": costs}
    if by:
        for name in PERTURBED:
            for f in (1 - by, 1 + by):
                out[f"{name} x{f:g}"] = msgspec.structs.replace(costs, **{name: getattr(costs, name) * f})
    return out


def _by_pair(rows: Iterable[SweepRow], calibration: str) -> dict[tuple[float, float], list[SweepRow]]:
    pairs: dict[tuple[float, float], list[SweepRow]] = defaultdict(list)
    for r in rows:
        if r.calibration == calibration and r.policy == "cache_aware":
            pairs[(r.latency_weight, r.decode_token_cost)].append(r)
    return pairs


def _geomean(xs: Sequence[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def recommend(
    rows: Sequence[SweepRow],
    calibration: str = "fitted",
    default: tuple[float, float] = DEFAULT,
    hit_slack: float = 0.01,
    slack: float = 0.02,
    guard: Sequence[str] = ("e2e_p95_ratio",),
) -> Recommendation:
    """The lowest TTFB p50 (geometric mean ratio over the cells) among the weight pairs that keep,
    at every (W, context), the hit rate within `hit_slack` of the default's, tokens/s within
    `slack` (relative) and each `guard` ratio (lower is better) within `slack` too; ties go to
    the pair nearest the default."""
    pairs = _by_pair(rows, calibration)
    if default not in pairs:
        raise ValueError(f"the default weights {default} are not in the sweep")
    ref = {(r.workers, r.context): r for r in pairs[default]}
    eligible = []
    for pair, cells in pairs.items():
        ok = all(
            r.cache_hit_rate >= ref[(r.workers, r.context)].cache_hit_rate - hit_slack
            and r.tokens_per_s_ratio >= ref[(r.workers, r.context)].tokens_per_s_ratio * (1 - slack)
            and all(getattr(r, g) <= getattr(ref[(r.workers, r.context)], g) * (1 + slack) for g in guard)
            for r in cells
        )
        if ok:
            score = _geomean([r.ttfb_p50_ratio for r in cells])
            eligible.append((round(score, 6), abs(pair[0] - default[0]) + abs(pair[1] - default[1]), pair))
    score, _, best = min(eligible)
    return Recommendation(
        latency_weight=best[0],
        decode_token_cost=best[1],
        ttfb_p50_geomean=score,
        default_ttfb_p50_geomean=_geomean([r.ttfb_p50_ratio for r in pairs[default]]),
        eligible=len(eligible),
    )


def direction_check(
    costs: EngineCosts, shape: Shape, real_csvs: Sequence[Path], seed: int = 0, min_context: int = 2048
) -> list[DirectionRow]:
    """Real prime/baseline vs simulated cache-aware/round-robin at W=2 and the default weights."""
    out = []
    for path in real_csvs:
        if not path.exists():
            continue
        cells = {(c.context, c.policy): c for c in load_perf_results(path)}
        for ctx in sorted({k[0] for k in cells if k[0] >= min_context}):
            if (ctx, "round_robin") not in cells or (ctx, "cache_aware") not in cells:
                continue
            cshape = dataclasses.replace(shape, context=ctx)
            sim_rr = run_knobs(costs, cshape, 2, "round_robin", seed, None)
            sim_ca = run_knobs(costs, cshape, 2, "cache_aware", seed, RoutingKnobs.from_config())
            for m in ("tokens_per_s", "ttfb_p50_ms", "ttfb_p95_ms", "e2e_p95_ms"):
                real = getattr(cells[(ctx, "cache_aware")], m) / getattr(cells[(ctx, "round_robin")], m)
                sim = sim_ca[m] / sim_rr[m]
                same = (real - 1) * (sim - 1) > 0 or (abs(real - 1) < 0.05 and abs(sim - 1) < 0.05)
                out.append(
                    DirectionRow(
                        source=path.name,
                        context=ctx,
                        metric=m,
                        real_ratio=real,
                        simulated_ratio=sim,
                        agree="yes" if same else "no",
                    )
                )
    return out


def plot(rows: Sequence[SweepRow], recs: Sequence[Recommendation], path: Path, calibration: str = "fitted") -> None:
    """Heatmaps over (latency_weight, decode_token_cost), one row of them per (W, context)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ca = [r for r in rows if r.calibration == calibration and r.policy == "cache_aware"]
    lws = sorted({r.latency_weight for r in ca})
    dcs = sorted({r.decode_token_cost for r in ca})
    cells = sorted({(r.workers, r.context) for r in ca})
    panels = (
        ("tokens_per_s_ratio", "tokens/s / round-robin", "RdYlGn", (0.5, 1.5)),
        ("ttfb_p50_ratio", "TTFB p50 / round-robin", "RdYlGn_r", (0.4, 1.6)),
        ("ttfb_p95_ratio", "TTFB p95 / round-robin", "RdYlGn_r", (0.3, 1.7)),
        ("cache_hit_rate", "cache hit rate", "viridis", (0.45, 0.85)),
    )
    fig, axes = plt.subplots(len(cells), len(panels), figsize=(4.2 * len(panels), 2.4 * len(cells)), squeeze=False)
    at = {(r.workers, r.context, r.latency_weight, r.decode_token_cost): r for r in ca}
    for i, (w, c) in enumerate(cells):
        for j, (metric, title, cmap, (lo, hi)) in enumerate(panels):
            ax = axes[i][j]
            grid = np.array([[getattr(at[(w, c, lw, dc)], metric) for lw in lws] for dc in dcs])
            im = ax.imshow(grid, origin="lower", aspect="auto", cmap=cmap, vmin=lo, vmax=hi)
            ax.set_xticks(
                range(0, len(lws), max(1, len(lws) // 5)),
                [f"{lws[k]:g}" for k in range(0, len(lws), max(1, len(lws) // 5))],
            )
            ax.set_yticks(range(len(dcs)), [f"{d:g}" for d in dcs])
            picks = [((r.latency_weight, r.decode_token_cost), mk) for r, mk in zip(recs, "o+", strict=False)]
            marks = [(DEFAULT, "x"), *picks]
            for pair, mk in marks:
                if pair[0] in lws and pair[1] in dcs:
                    ax.plot(lws.index(pair[0]), dcs.index(pair[1]), marker=mk, color="black", ms=8, mfc="none", mew=2)
            ax.set_title(f"W={w} {c} tok: {title}", fontsize=9)
            if i == len(cells) - 1:
                ax.set_xlabel("latency_weight")
            if j == 0:
                ax.set_ylabel("decode_token_cost")
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(
        "Simulated cost-model weights (perf/fleet_sim, fitted calibration); "
        "x: default, o: guarded pick, +: TTFB-p50-only pick"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main(argv: Sequence[str] | None = None) -> None:
    """CLI of the sweep."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=_ints, default=[2, 8])
    p.add_argument("--contexts", type=_ints, default=[2048, 4096])
    p.add_argument("--latency-weights", type=_floats, default=list(LATENCY_WEIGHTS))
    p.add_argument("--decode-token-costs", type=_floats, default=list(DECODE_TOKEN_COSTS))
    p.add_argument("--calibration", type=Path, default=ARTIFACTS / "fleet_costs.json")
    p.add_argument("--perturb", type=float, default=0.25, help="scale each step cost by 1 -/+ this too (0: off)")
    p.add_argument(
        "--real-csvs",
        type=lambda s: [Path(x) for x in s.split(",") if x],
        default=[ARTIFACTS / "perf_results.csv", ARTIFACTS / "perf_results_rerun.csv"],
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=ARTIFACTS)
    args = p.parse_args(argv)

    costs = load_costs(args.calibration)
    shape = Shape(context=args.contexts[0])  # the bench's (and the validation's) shape
    grid_lw = sorted(set(args.latency_weights) | {DEFAULT[0]})
    grid_dc = sorted(set(args.decode_token_costs) | {DEFAULT[1]})
    rows = sweep(perturbations(costs, args.perturb), shape, args.workers, args.contexts, grid_lw, grid_dc, args.seed)
    out: Path = args.out_dir
    write_csv(out / "cost_model_sweep.csv", rows)
    recs = {"guarded (hit, tok/s, e2e p95)": recommend(rows), "TTFB p50 only (hit, tok/s)": recommend(rows, guard=())}
    direction = direction_check(costs, shape, args.real_csvs, args.seed)
    if direction:
        write_csv(out / "cost_model_sweep_direction.csv", direction)
    plot(rows, list(recs.values()), out / "cost_model_sweep.png")
    report(rows, recs, direction)
    print(
        f"wrote {out}/cost_model_sweep.csv, cost_model_sweep.png"
        + (", cost_model_sweep_direction.csv" * bool(direction))
    )


def report(rows: Sequence[SweepRow], recs: dict[str, Recommendation], direction: Sequence[DirectionRow]) -> None:
    """The default and the recommendations per cell, their robustness to the calibration, the direction check."""
    pairs = _by_pair(rows, "fitted")
    print(
        f"\n{'weights':<12} {'W':>2} {'ctx':>5} {'tok/s x':>7} {'TTFB mean x':>11} {'p50 x':>6} {'p95 x':>6} "
        f"{'e2e p95 x':>9} {'hit':>5} {'rr hit':>6}"
    )
    for pair in dict.fromkeys((DEFAULT, *((r.latency_weight, r.decode_token_cost) for r in recs.values()))):
        for r in sorted(pairs[pair], key=lambda r: (r.workers, r.context)):
            print(
                f"{f'{pair[0]:g}, {pair[1]:g}':<12} {r.workers:>2} {r.context:>5} {r.tokens_per_s_ratio:>7.2f} "
                f"{r.ttfb_mean_ratio:>11.2f} {r.ttfb_p50_ratio:>6.2f} {r.ttfb_p95_ratio:>6.2f} {r.e2e_p95_ratio:>9.2f} "
                f"{r.cache_hit_rate:>5.3f} {r.baseline_hit_rate:>6.3f}"
            )
    for name, rec in recs.items():
        print(
            f"best, {name}: latency_weight {rec.latency_weight:g}, decode_token_cost {rec.decode_token_cost:g} "
            f"(of {rec.eligible} eligible pairs): TTFB p50 geometric mean {rec.ttfb_p50_geomean:.2f}x round-robin "
            f"vs {rec.default_ttfb_p50_geomean:.2f}x at the default {DEFAULT}"
        )
    others = sorted({r.calibration for r in rows} - {"fitted"})
    if others:
        print("\nperturbed calibrations: TTFB p50 geometric mean of the default; each pick's own best there")
        for cal in others:
            cp = _by_pair(rows, cal)
            at_default = _geomean([r.ttfb_p50_ratio for r in cp[DEFAULT]])
            own = [recommend(rows, calibration=cal, guard=g) for g in (("e2e_p95_ratio",), ())]
            picks = "; ".join(f"{o.latency_weight:g}, {o.decode_token_cost:g} ({o.ttfb_p50_geomean:.2f}x)" for o in own)
            print(f"  {cal:<28} default {at_default:.2f}x; guarded, p50-only: {picks}")
    if direction:
        print(f"\ndirection (W=2, default weights): {'source':<24} {'ctx':>5} {'metric':<13} {'real':>6} {'sim':>6}")
        for d in direction:
            print(
                f"{'':<33} {d.source:<24} {d.context:>5} {d.metric:<13} {d.real_ratio:>6.2f} "
                f"{d.simulated_ratio:>6.2f} {d.agree}"
            )


if __name__ == "__main__":
    main()
