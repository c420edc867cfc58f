"""Soak: steady load through every stage for `--minutes`, watching each process's RSS and fds.

    python -m perf.soak --minutes 30          # `make soak`
    python -m perf.soak --minutes 5           # a short one

The same system as the chaos run (perf/stack.py: router, engine --no-router, verifier,
learner, archiver, each its own process, on a local Tansu + redis-server), fed arithmetic
prompt batches under admission control, no faults. Every `--interval-s` the RSS and the
open file descriptors of each stage's process tree (the engine's includes vLLM's engine
core) are sampled with psutil. Pass: after the warm-up (the first `--warmup-frac` of the
run) every stage's RSS and fds stay within `--tolerance` of their post-warm-up value.
"Value" is the envelope, not one sample: the post-warm-up time is cut into `--windows`
equal windows and each window's peak (and trough) is compared with the first window's.
A learner's RSS swings 2.5-4.1 GB within every step (activations and optimizer buffers
allocated and returned to the OS), and an engine's jumps during a weight reload; a
sample-by-sample check failed on those swings (27 % and 14 % in a 6-minute run) while
saying nothing about growth. A leak raises the peaks window after window; the swings
do not. The largest sample-by-sample drift is still reported (`max_sample_drift`).
The broker and Redis are sampled too but not judged: Tansu's memory storage keeps every
record (it grows by design, see the broker notes), and Redis holds the ledgers' processed ids
(a 7-day TTL), so both grow
with the records served. A stage that exits during the soak fails it.

Writes artifacts/soak_report.csv (one row per process and sample), artifacts/soak_report.png
and artifacts/soak_summary.json.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import logging
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from learners.outcome_log import read_outcomes
from perf.common import ARTIFACTS
from perf.stack import Feeder, Observer, Stack, StackSettings, tree_usage

log = logging.getLogger("perf.soak")

SERVERS = ("broker", "redis")


def judge(rows: list[dict[str, Any]], warmup_s: float, tolerance: float, windows: int = 4) -> dict[str, Any]:
    """Per process: the peak and trough of each post-warm-up window against the first window's (see the module doc)."""
    out: dict[str, Any] = {}
    for proc in sorted({r["process"] for r in rows}):
        after = [r for r in rows if r["process"] == proc and r["t_s"] >= warmup_s]
        if len(after) < 2 * windows:
            out[proc] = {"judged": proc not in SERVERS, "pass": False, "reason": "too few samples after the warm-up"}
            continue
        t0, t1 = after[0]["t_s"], after[-1]["t_s"]
        span = max(t1 - t0, 1e-9)
        cut = [
            [r for r in after if min(windows - 1, int((r["t_s"] - t0) / span * windows)) == w] for w in range(windows)
        ]
        res: dict[str, Any] = {"judged": proc not in SERVERS, "samples": len(after), "windows": windows}
        ok = True
        for metric in ("rss_mb", "fds"):
            peaks = [max(r[metric] for r in c) for c in cut if c]
            troughs = [min(r[metric] for r in c) for c in cut if c]
            drift = max(
                max(abs(p - peaks[0]) / peaks[0] if peaks[0] else 0.0 for p in peaks),
                max(abs(t - troughs[0]) / troughs[0] if troughs[0] else 0.0 for t in troughs),
            )
            base = statistics.median(r[metric] for r in after[:3])
            sample = max(abs(r[metric] - base) / base if base else 0.0 for r in after)
            res[metric] = {
                "window_peaks": [round(p, 1) for p in peaks],
                "window_troughs": [round(t, 1) for t in troughs],
                "min": min(r[metric] for r in after),
                "max": max(r[metric] for r in after),
                "last": after[-1][metric],
                "max_drift": round(drift, 4),
                "max_sample_drift": round(sample, 4),
            }
            ok = ok and drift <= tolerance
        res["pass"] = ok
        out[proc] = res
    return out


def plot(rows: list[dict[str, Any]], warmup_s: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for proc in sorted({r["process"] for r in rows}):
        mine = [r for r in rows if r["process"] == proc]
        t = [r["t_s"] / 60 for r in mine]
        style = "--" if proc in SERVERS else "-"
        ax1.plot(t, [r["rss_mb"] for r in mine], style, label=proc)
        ax2.plot(t, [r["fds"] for r in mine], style, label=proc)
    for ax in (ax1, ax2):
        ax.axvline(warmup_s / 60, color="grey", linestyle=":", label="end of warm-up")
    ax1.set_ylabel("RSS (MiB, process tree)")
    ax2.set_ylabel("open fds (process tree)")
    ax2.set_xlabel("minutes")
    ax1.legend(fontsize=8, ncol=4)
    ax1.set_title("Soak: every stage under steady load (servers dashed, not judged)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    run_id = args.run_id or f"soak-{uuid.uuid4().hex[:6]}"
    work_dir = Path(args.work_dir or (ARTIFACTS / "soak" / run_id)).resolve()
    s = StackSettings(
        run_id=run_id,
        work_dir=work_dir,
        group_size=args.group_size,
        prompts_per_batch=args.prompts_per_batch,
        groups_per_step=args.groups_per_step,
        max_tokens=args.max_tokens,
        seed=args.seed,
    )
    stack = Stack(s)
    cfg = await stack.start_servers()
    observer = Observer(cfg, run_id)
    rows: list[dict[str, Any]] = []
    crashes: list[dict[str, Any]] = []
    feeder = None
    t0 = time.time()
    try:
        await stack.start_stages()
        await observer.start()
        feeder = Feeder(cfg, s, stack.outcomes_path, observer)
        stop = asyncio.Event()
        feed = asyncio.create_task(feeder.run(None, stop))
        t0 = time.time()
        duration = args.minutes * 60
        print(
            f"[soak] run {run_id}: {args.minutes} min, sampling every {args.interval_s}s; work dir {work_dir}",
            flush=True,
        )
        last_print = 0.0
        while time.time() - t0 < duration:
            now = time.time()
            pids = {k: st.proc.pid for k, st in stack.stages.items() if st.proc} | stack.server_pids()
            for name, pid in pids.items():
                rss, fds, n = tree_usage(pid)
                rows.append(
                    {
                        "t_s": round(now - t0, 1),
                        "process": name,
                        "pid": pid,
                        "rss_mb": round(rss / 2**20, 1),
                        "fds": fds,
                        "processes": n,
                    }
                )
            for k, st in stack.stages.items():
                if not st.alive():
                    crashes.append(
                        {
                            "stage": k,
                            "at_s": round(now - t0, 1),
                            "exit_code": st.proc.returncode if st.proc else None,
                            "log_tail": st.log_tail(15),
                        }
                    )
            if crashes:
                print(f"[soak] a stage exited: {[c['stage'] for c in crashes]}; stopping", flush=True)
                break
            if feed.done() and feed.exception():
                raise feed.exception()  # type: ignore[misc]
            if now - last_print >= 60:
                last_print = now
                steps = sum(1 for x in read_outcomes(stack.outcomes_path) if x.get("kind") == "step")
                latest = {r["process"]: f"{r['rss_mb']:.0f}MiB/{r['fds']}fd" for r in rows[-len(pids) :]}
                print(
                    f"[soak {now - t0:5.0f}s] published {feeder.samples} completions {len(observer.completion_ids)} "
                    f"steps {steps} | {latest}",
                    flush=True,
                )
            await asyncio.sleep(args.interval_s)
        stop.set()
        feed.cancel()
        await asyncio.gather(feed, return_exceptions=True)
        wall = time.time() - t0
        await asyncio.to_thread(stack.stop_all)
    finally:
        await observer.stop()
        await asyncio.to_thread(stack.stop_all)
        await asyncio.to_thread(stack.stop_servers)
        if not args.keep:
            import shutil

            shutil.rmtree(stack.state_dir / "policies", ignore_errors=True)
            stack.checkpoint_path.unlink(missing_ok=True)  # 1.1 GB with AdamW state
    warmup_s = wall * args.warmup_frac
    verdicts = judge(rows, warmup_s, args.tolerance, args.windows)
    steps = sum(1 for x in read_outcomes(stack.outcomes_path) if x.get("kind") == "step")
    summary = {
        "run_id": run_id,
        "minutes": round(wall / 60, 2),
        "interval_s": args.interval_s,
        "warmup_s": round(warmup_s, 1),
        "tolerance": args.tolerance,
        "samples_published": feeder.samples if feeder else 0,
        "completions": len(observer.completion_ids),
        "learner_steps": steps,
        "crashes": crashes,
        "processes": verdicts,
        "pass": not crashes and all(v["pass"] for v in verdicts.values() if v["judged"]),
    }
    csv_path, png_path = Path(args.out_csv), Path(args.out_png)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["t_s", "process", "pid", "rss_mb", "fds", "processes"])
        w.writeheader()
        w.writerows(rows)
    plot(rows, warmup_s, png_path)
    Path(args.out_summary).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--interval-s", type=float, default=5.0)
    p.add_argument("--warmup-frac", type=float, default=0.2)
    p.add_argument("--tolerance", type=float, default=0.10)
    p.add_argument("--windows", type=int, default=4, help="post-warm-up windows whose peaks and troughs are compared")
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--prompts-per-batch", type=int, default=8)
    p.add_argument("--groups-per-step", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-id", default="")
    p.add_argument("--work-dir", default="")
    p.add_argument("--keep", action="store_true", help="keep the policy folders of the work dir")
    p.add_argument("--out-csv", default=str(ARTIFACTS / "soak_report.csv"))
    p.add_argument("--out-png", default=str(ARTIFACTS / "soak_report.png"))
    p.add_argument("--out-summary", default=str(ARTIFACTS / "soak_summary.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    summary = asyncio.run(soak(args))
    for proc, v in summary["processes"].items():
        if "rss_mb" in v:
            print(
                f"{proc:9s} {'judged' if v['judged'] else 'not judged'}: "
                f"RSS window peaks {v['rss_mb']['window_peaks']} MiB, drift {v['rss_mb']['max_drift']:.1%}; "
                f"fds {v['fds']['window_peaks']}, drift {v['fds']['max_drift']:.1%} -> "
                f"{'ok' if v['pass'] else 'OVER'}"
            )
    print(
        f"{'PASS' if summary['pass'] else 'FAIL'}: {summary['minutes']} min, {summary['samples_published']} samples, "
        f"{summary['learner_steps']} learner steps; {args.out_csv}, {args.out_png}"
    )
    return 0 if summary["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
