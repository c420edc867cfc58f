"""What one plain sampling step costs on one CPU core: vLLM 0.32's CPU sampler (a fused
Gumbel-argmax kernel, `TopKTopPSampler.forward_cpu` -> `torch.ops._C.fused_gumbel_argmax`)
against an inverse-CDF draw (softmax, cumulative sum, one uniform and a binary search per
row), at SmolLM2's vocabulary. The issue-18 lever "inverse-CDF plain sampler" would replace
the first with the second; this measures what it could save per decode step.

    taskset -c 1 python -m perf.plain_sampler_cost [--batches 1,8,32] [--vocab 49152]

Writes artifacts/plain_sampler_cost.csv and .png (~10 s).
"""

from __future__ import annotations

import argparse
import csv
import time
from collections.abc import Callable
from pathlib import Path

import torch

from perf.workload import ROOT


def _time(fn: Callable[[], object], n: int = 200) -> float:
    for _ in range(20):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def measure(batches: list[int], vocab: int) -> list[dict[str, float]]:
    import vllm._C  # noqa: F401  (registers torch.ops._C)

    torch.set_num_threads(1)  # as a pinned engine runs (VLLM_CPU_OMP_THREADS_BIND: one core)
    rows = []
    for b in batches:
        logits = torch.randn(b, vocab)
        seeds = torch.randint(0, 2**31, (b,), dtype=torch.long)

        def inverse_cdf() -> torch.Tensor:
            cdf = logits.softmax(-1, dtype=torch.float32).cumsum_(-1)
            return torch.searchsorted(cdf, torch.rand(b, 1) * cdf[:, -1:], right=True)

        fused = _time(lambda: torch.ops._C.fused_gumbel_argmax(logits, seeds))
        icdf = _time(inverse_cdf)
        rows.append({"batch": b, "vocab": vocab, "fused_gumbel_ms": 1000 * fused, "inverse_cdf_ms": 1000 * icdf})
        print(f"batch {b:3d}: fused Gumbel-argmax {1000 * fused:.3f} ms, inverse CDF {1000 * icdf:.3f} ms")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--out-dir", default=str(ROOT / "artifacts"))
    a = p.parse_args()
    rows = measure([int(x) for x in a.batches.split(",")], a.vocab)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "plain_sampler_cost.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [r["batch"] for r in rows]
    ax.plot(xs, [r["fused_gumbel_ms"] for r in rows], "o-", label="vLLM 0.32 CPU (fused Gumbel-argmax)")
    ax.plot(xs, [r["inverse_cdf_ms"] for r in rows], "s-", label="inverse CDF")
    ax.set_xlabel("batch")
    ax.set_ylabel("ms per sampling step, one core")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "plain_sampler_cost.png", dpi=120)
    print(f"wrote {out / 'plain_sampler_cost.csv'}, {out / 'plain_sampler_cost.png'}")


if __name__ == "__main__":
    main()
