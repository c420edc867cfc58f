"""Advantage and loss math against hand-computed values; importance correction; one real update."""

from __future__ import annotations

import math

import pytest
import torch

from learners.advantages import gae, grpo_advantages, zero_variance
from learners.losses import clipped_surrogate, kl_penalty, value_loss


def test_grpo_advantages_by_hand() -> None:
    # rewards 1, 0, 0, 1: mean 0.5, population std 0.5
    assert grpo_advantages([1.0, 0.0, 0.0, 1.0]) == pytest.approx([1.0, -1.0, -1.0, 1.0], abs=1e-5)
    # Dr.GRPO: no std division
    assert grpo_advantages([1.0, 0.0, 0.0, 0.0], scale_by_std=False) == pytest.approx([0.75, -0.25, -0.25, -0.25])
    assert grpo_advantages([2.0, 2.0]) == pytest.approx([0.0, 0.0])
    assert zero_variance([1.0, 1.0, 1.0]) and not zero_variance([1.0, 0.0])


def test_gae_by_hand() -> None:
    # One sequence, 3 response tokens, reward 1 at the end, values 0.5 each, gamma 1, lambda 0.5.
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.5, 0.5]])
    mask = torch.ones(1, 3)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # deltas: t2 = 1 - 0.5 = 0.5; t1 = 0 + 0.5 - 0.5 = 0; t0 = 0
    # adv: t2 = 0.5; t1 = 0 + 0.5*0.5 = 0.25; t0 = 0 + 0.5*0.25 = 0.125
    assert adv.tolist() == [pytest.approx([0.125, 0.25, 0.5])]
    assert ret.tolist() == [pytest.approx([0.625, 0.75, 1.0])]


def test_clipped_surrogate_by_hand() -> None:
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0]])
    mask = torch.ones(1, 3)
    loss, stats = clipped_surrogate(logp, old, adv, mask, clip_eps=0.2)
    # min(r*A, clip(r)*A) with A=1: min(1.5,1.2)=1.2, min(0.5,0.8)=0.5, min(1.1,1.1)=1.1
    assert float(loss) == pytest.approx(-(1.2 + 0.5 + 1.1) / 3)
    assert stats["clip_frac"] == pytest.approx(2 / 3)
    # Negative advantage: the pessimistic bound is the clipped max.
    loss_neg, _ = clipped_surrogate(logp, old, -adv, mask, clip_eps=0.2)
    assert float(loss_neg) == pytest.approx((1.5 + 0.8 + 1.1) / 3)


def test_importance_correction_masks_too_stale_tokens() -> None:
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[20.0, 1.0]]))  # first token: ratio 20 > mask_ratio 10
    loss, stats = clipped_surrogate(logp, old, torch.tensor([[1.0]]), torch.ones(1, 2), mask_ratio=10.0)
    assert stats["masked_frac"] == pytest.approx(0.5)
    assert float(loss) == pytest.approx(-1.0)  # only the trusted token, ratio 1


def test_value_and_kl_by_hand() -> None:
    mask = torch.ones(1, 2)
    v = value_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), mask)
    assert float(v) == pytest.approx(0.5 * (1.0 + 0.0) / 2)
    logp = torch.log(torch.tensor([[0.5, 0.5]]))
    ref = torch.log(torch.tensor([[0.25, 0.5]]))
    k3 = (0.5 - math.log(0.5) - 1) / 2  # r = 0.25/0.5
    assert float(kl_penalty(logp, ref, mask)) == pytest.approx(k3)


def test_surrogate_reports_k3_kl_to_the_sampler() -> None:
    """kl = mean(r - 1 - log r) over trusted tokens: 0 when nothing moved, > 0 otherwise."""
    import math

    old = torch.zeros(1, 3)
    ratios = [1.5, 0.5, 1.1]
    _, stats = clipped_surrogate(torch.log(torch.tensor([ratios])), old, torch.tensor([[1.0]]), torch.ones(1, 3))
    assert stats["kl"] == pytest.approx(sum(r - 1 - math.log(r) for r in ratios) / 3, rel=1e-5)
    _, same = clipped_surrogate(old, old, torch.tensor([[1.0]]), torch.ones(1, 3))
    assert same["kl"] == pytest.approx(0.0, abs=1e-7)
