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
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import torch

from perf.common import ARTIFACTS, write_csv


class SamplerCost(msgspec.Struct):
    """One batch size's cost of a sampling step, both ways."""

    batch: int
    vocab: int
    fused_gumbel_ms: float
    inverse_cdf_ms: float


def _time(fn: Callable[[], object], n: int = 200) -> float:
    for _ in range(20):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def step_cost(batch: int, vocab: int) -> SamplerCost:
    """Both samplers on one batch of random logits."""
    logits = torch.randn(batch, vocab)
    seeds = torch.randint(0, 2**31, (batch,), dtype=torch.long)

    def inverse_cdf() -> torch.Tensor:
        cdf = logits.softmax(-1, dtype=torch.float32).cumsum_(-1)
        return torch.searchsorted(cdf, torch.rand(batch, 1) * cdf[:, -1:], right=True)

    fused = _time(lambda: torch.ops._C.fused_gumbel_argmax(logits, seeds))
    return SamplerCost(batch, vocab, 1000 * fused, 1000 * _time(inverse_cdf))


def measure(batches: list[int], vocab: int) -> list[SamplerCost]:
    import vllm._C  # noqa: F401  (registers torch.ops._C)

    torch.set_num_threads(1)  # as a pinned engine runs (VLLM_CPU_OMP_THREADS_BIND: one core)
    rows = []
    for b in batches:
        rows.append(r := step_cost(b, vocab))
        print(f"batch {b:3d}: fused Gumbel-argmax {r.fused_gumbel_ms:.3f} ms, inverse CDF {r.inverse_cdf_ms:.3f} ms")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--out-dir", default=str(ARTIFACTS))
    a = p.parse_args()
    rows = measure([int(x) for x in a.batches.split(",")], a.vocab)
    out = Path(a.out_dir)
    write_csv(out / "plain_sampler_cost.csv", rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [r.batch for r in rows]
    ax.plot(xs, [r.fused_gumbel_ms for r in rows], "o-", label="vLLM 0.32 CPU (fused Gumbel-argmax)")
    ax.plot(xs, [r.inverse_cdf_ms for r in rows], "s-", label="inverse CDF")
    ax.set_xlabel("batch")
    ax.set_ylabel("ms per sampling step, one core")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "plain_sampler_cost.png", dpi=120)
    print(f"wrote {out / 'plain_sampler_cost.csv'}, {out / 'plain_sampler_cost.png'}")


if __name__ == "__main__":
    main()
