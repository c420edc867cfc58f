"""Learning from multi-turn sessions (issue 23), without servers: the layout check, the
session's Sample and its loss mask, what a Batch trains on, and that tool tokens carry
no gradient through any term of the GRPO or PPO loss."""

from __future__ import annotations

import msgspec
import pytest
import torch
from torch import nn

from learners.advantages import gae
from learners.group_buffer import GroupBuffer, sample_of
from learners.policy_model import Batch
from learners.samples import Sample
from learners.trainer import TrainConfig, Trainer
from plumbing.config import LearnerConfig
from plumbing.sessions import check_layout
from plumbing.trust import Rejected, prompt_hash, token_hash
from schemas import Completion, Reward, RewardStatus
from schemas.sessions import Segment
from tests.reward_helpers import make_completion
from tests.session_helpers import Turn, with_session

PROMPT = [1, 2, 3]
# Three turns, every token id distinct: model tokens 1x/2x/3x, tool tokens 5x/6x.
TURN0 = Turn([10, 11], [-0.1, -0.2], 4, [50, 51, 52])
TURN1 = Turn([20, 21, 22], [-0.3, -0.4, -0.5], 5, [60])
LAST_TOKENS, LAST_LOGPROBS = [30, 31], [-0.6, -0.7]
TOOL = [50, 51, 52, 60]


def _session(group: str = "g", index: int = 0, n: int = 2, last_tokens: list[int] = LAST_TOKENS) -> Completion:
    last = msgspec.structs.replace(
        make_completion("<answer>1</answer>", reference="1"),
        id=f"{group}/{index}",
        request_id=f"req-{group}-t2",
        group_id=group,
        group_size=n,
        sample_index=index,
        prompt_token_ids=PROMPT,
        token_ids=last_tokens,
        logprobs=[-0.6] * len(last_tokens) if last_tokens != LAST_TOKENS else LAST_LOGPROBS,
        policy_version=6,
    )
    return with_session(last, [TURN0, TURN1])


def _reward(c: Completion, scalar: float) -> Reward:
    return Reward(
        run_id=c.run_id,
        completion_id=c.id,
        request_id=c.request_id,
        group_id=c.group_id,
        prompt_hash=prompt_hash(c.prompt),
        tokens_hash=token_hash(c.token_ids),
        policy_version=c.policy_version,
        verifier_id="v",
        verifier_version="1",
        components={},
        scalar=scalar,
        status=RewardStatus.OK,
    )


def test_the_layout_check_accepts_the_env_hubs_layout_and_refuses_any_other() -> None:
    good = _session()
    check_layout(good)
    s = good.session
    assert s is not None
    gap = [s.segments[0], Segment("tool", 3, 5), *s.segments[2:]]  # [2, 3) covered by nothing
    short = s.segments[:-1]  # the last tool response not covered
    overlap = [Segment("model", 0, 3, 4), *s.segments[1:]]
    bad = {
        "gap": msgspec.structs.replace(good, session=msgspec.structs.replace(s, segments=gap)),
        "short": msgspec.structs.replace(good, session=msgspec.structs.replace(s, segments=short)),
        "overlap": msgspec.structs.replace(good, session=msgspec.structs.replace(s, segments=overlap)),
        "logprobs": msgspec.structs.replace(good, session=msgspec.structs.replace(s, logprobs=s.logprobs[:-1])),
        "prompt_len": msgspec.structs.replace(good, session=msgspec.structs.replace(s, prompt_len=99)),
        "extra_token": msgspec.structs.replace(good, prompt_token_ids=[*good.prompt_token_ids, 7]),
        "output_logprobs": msgspec.structs.replace(good, logprobs=good.logprobs[:1]),
        "no_session": msgspec.structs.replace(good, session=None),
    }
    for what, c in bad.items():
        with pytest.raises(Rejected) as err:
            check_layout(c)
        assert err.value.reason == "session_layout", what


def test_a_session_sample_trains_on_every_turns_sampled_tokens_in_order_and_masks_the_tool_tokens() -> None:
    longer = _session(index=1, last_tokens=[32, 33, 34, 35])  # a longer session: padding in the batch
    samples = [sample_of(_session(), _reward(_session(), 1.0)), sample_of(longer, _reward(longer, 0.0))]
    first = samples[0]
    assert first.prompt_token_ids == PROMPT
    assert first.token_ids == [10, 11, 50, 51, 52, 20, 21, 22, 60, 30, 31]
    assert first.loss_mask == [1, 1, 0, 0, 0, 1, 1, 1, 0, 1, 1]
    assert first.policy_version == 4  # the oldest turn's, not the last turn's 6
    batch = Batch(
        [s.prompt_token_ids for s in samples],
        [s.token_ids for s in samples],
        [s.logprobs for s in samples],
        pad_id=0,
        loss_masks=[s.loss_mask for s in samples],
    )
    targets = batch.input_ids[:, 1:]
    for s, last, last_lp, i in ((first, LAST_TOKENS, LAST_LOGPROBS, 0), (samples[1], [32, 33, 34, 35], [-0.6] * 4, 1)):
        trained = batch.mask[i] == 1
        assert targets[i][trained].tolist() == TURN0.tokens + TURN1.tokens + last
        assert batch.old_logp[i][trained].tolist() == pytest.approx(TURN0.logprobs + TURN1.logprobs + last_lp)
        response = torch.zeros_like(trained)
        response[len(PROMPT) - 1 : len(PROMPT) - 1 + len(s.token_ids)] = True
        assert targets[i][response & ~trained].tolist() == TOOL  # masked: exactly the tool tokens
        assert not trained[: len(PROMPT) - 1].any() and not trained[len(PROMPT) - 1 + len(s.token_ids) :].any()


def test_single_turn_samples_and_old_checkpoints_train_on_every_completion_token() -> None:
    c = make_completion("x")
    s = sample_of(c, _reward(c, 1.0))
    assert s.loss_mask == [] and s.token_ids == c.token_ids and s.prompt_token_ids == c.prompt_token_ids
    old = {k: v for k, v in msgspec.to_builtins(s).items() if k != "loss_mask"}  # a Sample written before sessions
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(old), type=Sample).loss_mask == []
    batch = Batch([s.prompt_token_ids], [s.token_ids], [s.logprobs], 0, [s.loss_mask])
    assert batch.mask.sum() == len(c.token_ids)


class _TableModel(nn.Module):
    """A stand-in policy with one free log-prob (and value) per position: the gradient at a
    position is then exactly the loss's dependence on that position's token."""

    def __init__(self, n: int, positions: int, value_head: bool, fill: float = -1.0) -> None:
        super().__init__()
        self.logp = nn.Parameter(torch.full((n, positions), fill))
        self.values = nn.Parameter(torch.linspace(0.1, 0.9, positions).repeat(n, 1)) if value_head else None
        self.pad_id = 0

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.logp * 1.0, None if self.values is None else self.values * 1.0


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_tool_tokens_get_no_gradient_and_changing_their_log_probs_leaves_the_loss_unchanged(algo: str) -> None:
    sessions = [_session(index=0), _session(index=1)]
    samples = [sample_of(c, _reward(c, r)) for c, r in zip(sessions, [1.0, 0.0], strict=True)]
    samples = [msgspec.structs.replace(s, logprobs=[-1.0] * len(s.token_ids)) for s in samples]  # ratio 1
    positions = len(PROMPT) + len(samples[0].token_ids) - 1
    model = _TableModel(2, positions, value_head=algo == "ppo")
    reference = _TableModel(2, positions, value_head=False, fill=-2.0)  # a KL term with a gradient everywhere
    trainer = Trainer(
        model,  # type: ignore[arg-type]
        TrainConfig.from_learner(LearnerConfig(algo=algo, kl_coef=0.1, dr_grpo=True)),
        reference=reference,  # type: ignore[arg-type]
    )
    _, advs = trainer.prepare([samples])
    # Where the layout puts the tool tokens: position t predicts token t + 1.
    tool_at = [len(PROMPT) - 1 + j for j, m in enumerate(samples[0].loss_mask) if m == 0]
    model_at = [len(PROMPT) - 1 + j for j, m in enumerate(samples[0].loss_mask) if m == 1]
    assert len(tool_at) == len(TOOL)
    loss, _ = trainer._loss(samples, advs)
    loss.backward()
    assert model.logp.grad is not None
    assert torch.all(model.logp.grad[:, tool_at] == 0)
    assert torch.all(model.logp.grad[:, model_at] != 0)  # the test can see a gradient where there is one
    if model.values is not None:
        assert model.values.grad is not None
        assert torch.all(model.values.grad[:, tool_at] == 0) and torch.any(model.values.grad[:, model_at] != 0)
    with torch.no_grad():
        model.logp[:, tool_at] += 3.0  # the policy now "predicts" the tool tokens very differently
        if model.values is not None:
            model.values[:, tool_at] -= 5.0
        assert float(trainer._loss(samples, advs)[0]) == pytest.approx(float(loss), abs=1e-7)
        model.logp[:, model_at[0]] += 0.05  # while a model token's does change it
        assert float(trainer._loss(samples, advs)[0]) != pytest.approx(float(loss), abs=1e-7)


def test_gae_bootstraps_an_earlier_turn_across_the_tool_tokens() -> None:
    mask = torch.tensor([[0.0, 1, 1, 0, 0, 1, 1]])
    rewards = torch.tensor([[0.0, 0, 0, 0, 0, 0, 1]])
    values = torch.tensor([[9.0, 0, 0, 9, 9, 0, 0]])  # values on masked positions must not leak in
    adv, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert adv.tolist() == [[0.0, 1, 1, 0, 0, 1, 1]]
    assert returns.tolist() == [[0.0, 1, 1, 0, 0, 1, 1]]
    contiguous = torch.tensor([[0.0, 1, 1, 1, 0]])
    adv, _ = gae(torch.tensor([[0.0, 0, 0, 2, 0]]), torch.tensor([[0.0, 0.5, 0.5, 0.5, 7]]), contiguous, 0.9, 0.5)
    # Textbook GAE with the value after the last token 0: deltas -0.05, -0.05, 1.5.
    d = [0.9 * 0.5 - 0.5, 0.9 * 0.5 - 0.5, 2 - 0.5]
    expected = [0.0, d[0] + 0.45 * (d[1] + 0.45 * d[2]), d[1] + 0.45 * d[2], d[2], 0.0]
    assert adv[0].tolist() == pytest.approx(expected)


def test_a_trajectory_and_its_reward_join_into_a_group_and_staleness_counts_the_oldest_turn() -> None:
    buf = GroupBuffer(max_policy_lag=2, group_timeout_s=10.0)
    a, b = _session(index=0), _session(index=1)
    assert buf.add_completion(a, 0.0, version=6) == []
    assert buf.add_reward(_reward(b, 0.0), 0.0, version=6) == []
    assert buf.add_reward(_reward(a, 1.0), 0.0, version=6) == [] and buf.add_completion(b, 0.0, version=6) == []
    [group] = buf.take(1, version=6).groups
    assert [s.loss_mask for s in group] == [[1, 1, 0, 0, 0, 1, 1, 1, 0, 1, 1]] * 2
    assert [s.reward for s in group] == [1.0, 0.0]
    # Version 7: the last turns (v6) are fresh, the first turns (v4) are 3 behind, over the lag of 2.
    late = _session("h", 0)
    buf.add_completion(late, 0.0, version=7)
    [drop] = buf.add_reward(_reward(late, 1.0), 0.0, version=7)
    assert drop.reason == "stale" and drop.ids == [late.id] and "v4" in drop.detail
