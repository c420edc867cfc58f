"""Policy-gradient losses with the importance correction between sampler and learner.

The engines sample under policy version v; the learner trains version v+k. The ratio
exp(learner_logp - sampler_logp) corrects for that lag: the PPO-style clip bounds the
update, and tokens whose ratio leaves [1/mask_ratio, mask_ratio] are masked out
entirely (too stale to trust), as the off-policy RL anchors do.
"""

from __future__ import annotations

import torch


def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    mask_ratio: float = 10.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-level clipped surrogate loss, averaged over unmasked tokens.

    logp, old_logp, mask: [batch, T]; advantages: [batch, T] (or [batch, 1], broadcast).
    Returns the loss and stats (clip fraction, masked fraction, mean ratio, and `kl`: the
    k3 estimate of KL(learner || sampler) over the trusted tokens, how far the update has
    moved from the policy that sampled, reported whether or not a KL penalty is on).
    """
    ratio = torch.exp(logp - old_logp)
    trusted = ((ratio < mask_ratio) & (ratio > 1.0 / mask_ratio)).to(logp.dtype)
    m = mask * trusted
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    n = m.sum().clamp(min=1.0)
    loss = (per_token * m).sum() / n
    with torch.no_grad():
        stats = {
            "clip_frac": float((((ratio - 1).abs() > clip_eps).to(logp.dtype) * m).sum() / n),
            "masked_frac": float(1 - m.sum() / mask.sum().clamp(min=1.0)),
            "ratio_mean": float((ratio * m).sum() / n),
            "kl": float(((ratio - 1 - (logp - old_logp)) * m).sum() / n),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip_eps: float = 0.2
) -> torch.Tensor:
    """PPO's clipped value loss, averaged over unmasked tokens."""
    clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    per_token = torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(policy || reference), averaged over unmasked tokens (always >= 0)."""
    log_ratio = ref_logp - logp
    per_token = torch.exp(log_ratio) - log_ratio - 1
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
