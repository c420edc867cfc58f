"""How to serve a GRPO group: one request with n=G, or G requests sharing the cached prefix.

Same engine, same prompts, alternating modes in one run:

    python -m perf.group_sampling --prompts 8 --group-size 4 --max-tokens 32 --repeats 2

Writes artifacts/group_sampling.csv (mode, repeat, samples, generated_tokens, wall_s,
tokens_per_s, prompt_tokens_computed) and a plot.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import msgspec

from engine_workers.engine import Engine
from engine_workers.requests import build_input
from perf.common import ARTIFACTS, write_csv
from plumbing.config import load_config
from plumbing.model_store import resolve_model
from plumbing.runtime import run, setup_logging
from producers.arithmetic import arithmetic_requests


class Row(msgspec.Struct):
    """One mode of one repeat."""

    mode: str
    repeat: int
    samples: int
    generated_tokens: int
    wall_s: float
    tokens_per_s: float
    prompt_tokens_computed: int


async def _one_mode(engine: Engine, mode: str, repeat: int, args: argparse.Namespace) -> Row:
    # A fresh prompt set per repeat, so no mode profits from the other's cache.
    reqs = arithmetic_requests(
        "bench",
        args.prompts,
        args.group_size,
        seed=1000 + repeat * 2 + (mode == "separate"),
        max_tokens=args.max_tokens,
        grammar=None,
    )
    jobs = []
    for r in reqs:
        inp = build_input(r, engine.tokenizer, engine.max_model_len)
        if mode == "n_equals_g":
            jobs.append((inp.prompt_token_ids, inp.params, r.id))
        else:
            single = msgspec.structs.replace(r, group_size=1)
            one = build_input(single, engine.tokenizer, engine.max_model_len)
            jobs.extend((one.prompt_token_ids, one.params, f"{r.id}-{i}") for i in range(args.group_size))
    tokens = 0
    computed = 0

    async def go(ids: list[int], params: object, rid: str) -> None:
        nonlocal tokens, computed
        cached = 0
        async for step in engine.stream(ids, params, rid):
            tokens += sum(len(d.token_ids) for d in step.deltas)
            cached = max(cached, step.num_cached_tokens)
        computed += len(ids) - cached

    t0 = time.perf_counter()
    await asyncio.gather(*(go(*j) for j in jobs))
    wall = time.perf_counter() - t0
    return Row(mode, repeat, args.prompts * args.group_size, tokens, wall, tokens / wall, computed)


async def main(args: argparse.Namespace) -> list[Row]:
    cfg = load_config()
    engine = Engine(cfg.engine, resolve_model(cfg.engine.model))
    await engine.start()
    rows = []
    try:
        for rep in range(args.repeats):
            for mode in ("n_equals_g", "separate"):
                row = await _one_mode(engine, mode, rep, args)
                print(row, flush=True)
                rows.append(row)
    finally:
        engine.shutdown()
    return rows


def plot(rows: list[Row], path: str) -> None:
    """Tokens/s per mode and repeat."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(
        [f"{r.mode}\n#{r.repeat + 1}" for r in rows],
        [r.tokens_per_s for r in rows],
        color=["tab:blue" if r.mode == "n_equals_g" else "tab:gray" for r in rows],
    )
    ax.set_ylabel("generated tokens/s")
    ax.set_title("GRPO group: n=G in one request vs G requests")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    setup_logging("WARNING")
    rows = run(main(args))
    write_csv(ARTIFACTS / "group_sampling.csv", rows)
    plot(rows, str(ARTIFACTS / "group_sampling.png"))
