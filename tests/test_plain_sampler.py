"""engine_workers/vllm_patches.py `plain_tokens_by_inverse_cdf`: vLLM's CPU sampler,
replaced by an inverse-CDF draw, samples the same distribution (against the softmax and
against vLLM's own kernel), honours top-k/top-p masks and per-request generators, and
returns vLLM's processed logprobs.

Each test installs the patch and puts vLLM's attribute back afterwards.
"""

from __future__ import annotations

import pytest
import torch

from engine_workers import vllm_patches

# chi-square 0.9999 quantiles (a correct sampler fails a test 1 time in 10,000).
CHI2_9999 = {1: 15.14, 2: 18.42, 4: 23.51}


@pytest.fixture
def sampler(monkeypatch):
    """A vLLM CPU sampler with the patch installed; vLLM's attribute restored afterwards."""
    import vllm._C  # noqa: F401  (registers vLLM's CPU kernels: torch.ops._C, as a worker has them)
    from vllm.v1.sample.ops import topk_topp_sampler as ops

    current = ops.TopKTopPSampler.__call__
    while getattr(current, "primerl_replaced", None) is not None:
        current = current.primerl_replaced
    monkeypatch.setattr(ops.TopKTopPSampler, "__call__", current)
    assert vllm_patches.apply(["plain_tokens_by_inverse_cdf"]) == ["plain_tokens_by_inverse_cdf"]
    s = ops.TopKTopPSampler()
    assert s.forward.__func__ is ops.TopKTopPSampler.forward_cpu  # this machine takes vLLM's CPU path
    return s


def _counts(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).double()


def _chi2(observed: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * observed.sum()
    keep = expected > 0
    assert observed[~keep].sum() == 0, "a token of zero probability was drawn"
    return float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def _chi2_homogeneity(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    """Two-sample chi-square of equal totals; (statistic, degrees of freedom)."""
    keep = (a + b) > 0
    a, b = a[keep], b[keep]
    return float(((a - b) ** 2 / (a + b)).sum()), int(keep.sum()) - 1


LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -float("inf")])  # token 5 masked


def test_draws_follow_the_softmax_and_match_vllms_kernel(sampler) -> None:
    n = 40_000
    logits = LOGITS.repeat(n, 1)
    probs = LOGITS.softmax(-1).double()
    torch.manual_seed(1)
    ours = _counts(sampler(logits.clone(), {}, None, None)[0], 6)
    assert _chi2(ours, probs) < CHI2_9999[4]
    # vLLM's own CPU kernel on the same logits: the two samples come from one distribution.
    torch.manual_seed(2)
    theirs = _counts(sampler.forward_cpu(logits.clone(), {}, None, None)[0], 6)
    stat, dof = _chi2_homogeneity(ours, theirs)
    assert dof == 4 and stat < CHI2_9999[4]
    # The test can fail: a sampler biased toward one token by 2 % of its mass is caught.
    biased = ours.clone()
    biased[0] += 0.02 * n
    biased[1] -= 0.02 * n
    assert _chi2(biased, probs) > CHI2_9999[4]


def test_it_is_the_inverse_cdf_not_vllms_kernel(sampler) -> None:
    # Under one global seed the result is the token whose exact CDF interval holds the row's uniform.
    logits = torch.randn(8, 49152) * 3
    torch.manual_seed(7)
    got, processed = sampler(logits.clone(), {}, None, None)
    torch.manual_seed(7)
    cdf = logits.double().softmax(-1).cumsum(-1)
    expected = torch.searchsorted(cdf, torch.rand(8, 1, dtype=torch.float64) * cdf[:, -1:], right=True).view(-1)
    assert got.dtype == torch.int64 and got.shape == (8,)
    assert torch.equal(got, expected) and processed is None


def test_every_token_gets_its_exact_interval_on_a_full_vocabulary() -> None:
    # A flat 49k-token row (each token ~2e-5 of the mass): a uniform just inside either end of
    # token i's exact (float64) CDF interval, 1/1000 of its width in, must draw token i. Torch sums
    # a float32 cumsum in double but stores each entry in float32, which moves a boundary near the
    # end of the row by up to 6e-8, three times that margin (the tokens' widths off by ~0.3 %:
    # 3.3e-4 total variation); the block sums keep every boundary within ~1e-9.
    torch.manual_seed(0)
    probs = (torch.randn(49152) * 0.5).softmax(-1)
    exact = probs.double().cumsum(-1)
    tokens = torch.randint(0, 49152, (300,))
    lo = torch.where(tokens > 0, exact[(tokens - 1).clamp_min(0)], torch.zeros(300, dtype=torch.float64))
    hi = exact[tokens]
    margin = (hi - lo) / 1000
    probes = (torch.cat([lo + margin, hi - margin]) / exact[-1]).unsqueeze(1)
    rows = probs.repeat(600, 1)
    assert torch.equal(vllm_patches.inverse_cdf_tokens(rows.clone(), probes), torch.cat([tokens, tokens]))
    # The test can fail: one float32 cumsum over the row misses many of them.
    flat = rows.clone().cumsum(-1)
    single = torch.searchsorted(flat, (probes * flat[:, -1:].double()).float(), right=True).view(-1)
    assert (single != torch.cat([tokens, tokens])).sum() > 30
    # Zero-probability tokens (masked, or the padding of a last partial block) are never drawn.
    masked = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0]]).repeat(5, 1)
    edges = torch.tensor([[0.0], [0.2499], [0.25], [0.9999], [1 - 2**-53]], dtype=torch.float64)
    assert vllm_patches.inverse_cdf_tokens(masked, edges, block=2).tolist() == [1, 1, 3, 3, 3]


def test_top_k_and_top_p_masks_are_honoured(sampler) -> None:
    n = 30_000
    logits = LOGITS.repeat(n, 1)
    tokens = sampler(logits.clone(), {}, torch.full((n,), 2), None)[0]
    probs = torch.tensor([2.0, 1.0]).softmax(-1).double()
    assert set(tokens.tolist()) <= {0, 1}
    assert _chi2(_counts(tokens, 2), probs) < CHI2_9999[1]
    # top-p 0.8 keeps the fewest most-likely tokens whose mass reaches 0.8: tokens 0, 1, 2 here.
    p = LOGITS.softmax(-1)
    assert p[:2].sum() < 0.8 <= p[:3].sum()
    tokens = sampler(logits.clone(), {}, None, torch.full((n,), 0.8))[0]
    assert set(tokens.tolist()) == {0, 1, 2}
    assert _chi2(_counts(tokens, 3), (p[:3] / p[:3].sum()).double()) < CHI2_9999[2]


def test_seeded_rows_repeat_with_their_generator_and_leave_the_others_alone(sampler) -> None:
    logits = torch.zeros(3, 1000)  # uniform rows: any two draws that agree 20 times over are not chance

    def draw(seed: int) -> list[int]:
        gens = {1: torch.Generator().manual_seed(seed)}
        return [int(sampler(logits.clone(), gens, None, None)[0][1]) for _ in range(20)]

    assert draw(11) == draw(11)
    assert draw(11) != draw(12)
    # Unseeded rows draw from the global generator, as before the patch.
    torch.manual_seed(3)
    a = sampler(logits.clone(), {1: torch.Generator().manual_seed(5)}, None, None)[0]
    torch.manual_seed(3)
    b = sampler(logits.clone(), {1: torch.Generator().manual_seed(99)}, None, None)[0]
    assert a[0] == b[0] and a[2] == b[2]


def test_processed_logprobs_and_float64_noise_stay_vllms(sampler) -> None:
    from vllm.v1.sample.ops import topk_topp_sampler as ops

    logits = torch.randn(4, 50)
    k = torch.full((4,), 5)
    lp = ops.TopKTopPSampler(logprobs_mode="processed_logprobs")
    _, processed = lp(logits.clone(), {}, k, None)
    masked = ops.apply_top_k_top_p(logits.clone(), k, None)
    assert torch.allclose(processed, masked.log_softmax(-1))
    # Asked for float64 noise, the sampler runs vLLM's own path (exponential races under the global seed).
    fp64 = ops.TopKTopPSampler(use_fp64_gumbel=True)
    torch.manual_seed(4)
    got = fp64(logits.clone(), {}, None, None)[0]
    torch.manual_seed(4)
    assert torch.equal(got, fp64.forward_cpu(logits.clone(), {}, None, None)[0])


def test_the_worker_applies_it_unless_the_engine_config_says_not_to() -> None:
    import types

    from engine_workers.speculation.null_proposer import worker_patches

    def config(on: bool) -> types.SimpleNamespace:
        return types.SimpleNamespace(additional_config={"primerl_speculation": {"inverse_cdf_sampler": on}})

    assert worker_patches(config(True)) == list(vllm_patches.WORKER)
    assert "plain_tokens_by_inverse_cdf" not in worker_patches(config(False))
    assert len(worker_patches(config(False))) == len(vllm_patches.WORKER) - 1
