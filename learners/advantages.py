"""Advantages: GRPO's group-normalized rewards (with Dr.GRPO and DAPO options) and PPO's GAE."""

from __future__ import annotations

import torch


def grpo_advantages(rewards: list[float], *, scale_by_std: bool = True, eps: float = 1e-6) -> list[float]:
    """Advantage of each sample of one group: reward minus the group mean, divided by the
    group's std (GRPO) or not (Dr.GRPO, `scale_by_std=False`)."""
    if not rewards:
        return []
    t = torch.tensor(rewards, dtype=torch.float64)
    centred = t - t.mean()
    if scale_by_std:
        centred = centred / (t.std(unbiased=False) + eps)
    return centred.tolist()


def zero_variance(rewards: list[float], tol: float = 1e-9) -> bool:
    """True when every sample of a group has the same reward: it teaches nothing (DAPO filters it)."""
    return max(rewards) - min(rewards) <= tol if rewards else True


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over token positions.

    rewards, values, mask: [batch, T]; mask is 1 on the response tokens trained on. The
    value after the last of them is 0 (episode end). Masked positions inside a response
    (a session's tool tokens) are skipped: each trained token bootstraps from the next
    trained one, so an earlier turn still sees the final reward. With a contiguous mask
    this is the textbook recursion. Returns (advantages, returns).
    """
    batch, length = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(batch, dtype=rewards.dtype)  # advantage at the next trained position
    next_value = torch.zeros(batch, dtype=rewards.dtype)  # value at the next trained position
    for t in reversed(range(length)):
        on = mask[:, t] > 0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        here = delta + gamma * lam * last
        adv[:, t] = here * mask[:, t]
        last = torch.where(on, here, last)
        next_value = torch.where(on, values[:, t], next_value)
    return adv, (adv + values) * mask
