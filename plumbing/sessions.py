"""Reading a finished session's last-turn completion (issue 23): its layout check and what a learner trains on.

Verifiers and learners both take a session only from rollout.trajectories, and both
check the layout of its (engine-signed) completion with `check_layout` before using it:
the segments must tile the response part of `prompt_token_ids` exactly, or a learner
could be made to train on tool tokens (or skip model ones). The signature says the
engine saw this layout; this check says the layout is one a learner can use.
"""

from __future__ import annotations

from plumbing.trust import Rejected
from schemas import Completion


def check_layout(c: Completion) -> None:
    """Raise Rejected("session_layout") unless `c` is a session turn whose segments cover
    `prompt_token_ids[prompt_len:]` contiguously from 0, with one log-prob per covered token."""
    s = c.session
    if s is None:
        raise Rejected("session_layout", f"completion {c.id} carries no session")
    response = len(c.prompt_token_ids) - s.prompt_len
    if s.prompt_len < 0 or response < 0:
        raise Rejected("session_layout", f"prompt_len {s.prompt_len} outside the {len(c.prompt_token_ids)} tokens")
    at = 0
    for i, seg in enumerate(s.segments):
        if seg.start != at or seg.end < seg.start:
            raise Rejected("session_layout", f"segment {i} [{seg.start}, {seg.end}) does not continue at {at}")
        at = seg.end
    if at != response:
        raise Rejected("session_layout", f"segments cover {at} tokens, the response before this turn has {response}")
    if len(s.logprobs) != response:
        raise Rejected("session_layout", f"{len(s.logprobs)} session log-probs for {response} response tokens")
    if len(c.logprobs) != len(c.token_ids):  # the trained log-probs must line up token for token
        raise Rejected("session_layout", f"{len(c.logprobs)} log-probs for {len(c.token_ids)} output tokens")


def loss_mask(c: Completion) -> list[int]:
    """1 per model token, 0 per tool token of the whole response (earlier turns, then `c`'s own
    output, an implicit final model segment). Assumes `check_layout(c)` passed."""
    assert c.session is not None
    mask = [int(seg.kind == "model") for seg in c.session.segments for _ in range(seg.end - seg.start)]
    return mask + [1] * len(c.token_ids)


def oldest_version(c: Completion) -> int:
    """The oldest policy that sampled any trained token: staleness bounds stay conservative."""
    assert c.session is not None
    return min([c.policy_version] + [seg.version for seg in c.session.segments if seg.kind == "model"])
