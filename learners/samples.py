"""What a learner trains on: a completion joined with its verified reward."""

from __future__ import annotations

import msgspec

from schemas import RewardStatus


class Sample(msgspec.Struct, frozen=True):
    """One scored sample of a group, with what the update needs."""

    completion_id: str
    group_id: str
    group_size: int
    sample_index: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    policy_version: int
    reward: float
    status: RewardStatus
    reward_id: str = ""  # the Reward message it was scored by (recorded per step, for exact replays)
    # Issue 23: 1 per token of `token_ids` the policy sampled, 0 per tool-response token of a
    # session (never trained on). Empty: every token is trained (single turns, and the
    # checkpoints and outcome logs written before sessions, which decode with the default).
    loss_mask: list[int] = []

    @property
    def trainable(self) -> bool:
        """INFRA_FAIL and TIMEOUT are the verifier's failures: masked out of the loss."""
        return self.status in (RewardStatus.OK, RewardStatus.POLICY_FAIL)


class StepStats(msgspec.Struct):
    """What one update step did."""

    step: int
    policy_version: int
    samples: int
    groups: int
    reward_mean: float
    loss: float
    policy_lag_mean: float
    clip_frac: float
    masked_frac: float
    wall_s: float
    # Last, with defaults: checkpoints and replays written before them still decode.
    reward_std: float = 0.0
    kl: float = 0.0  # k3 KL(learner || sampler) over trusted tokens (learners/losses.py)
