"""Exact-match and regex-match rewards against the request's reference."""

from __future__ import annotations

import re

from schemas import Completion, RewardStatus
from verifier_workers.rewards.base import Score, clip, infra_fail, policy_fail

# Python's `re` has no timeout and holds the GIL; a long model output against a
# backtracking pattern is the costly case, so only this much text is matched.
MAX_REGEX_TEXT = 32_768


class ExactReward:
    """1.0 when the stripped text equals the stripped reference (optionally case-folded)."""

    name = "exact"
    version = "1"

    def __init__(self, casefold: bool = False) -> None:
        self.casefold = casefold

    async def score(self, completion: Completion) -> Score:
        """OK with `match` 1/0; POLICY_FAIL for an empty output; INFRA_FAIL without a reference."""
        if completion.reference is None:
            return infra_fail("request carries no reference")
        text, reference = completion.text.strip(), completion.reference.strip()
        if not text:
            return policy_fail("empty output", {"match": 0.0})
        if self.casefold:
            text, reference = text.casefold(), reference.casefold()
        value = 1.0 if text == reference else 0.0
        return Score({"match": value}, value, RewardStatus.OK, {"answer": clip(completion.text.strip(), 200)})


class RegexReward:
    """1.0 when the stripped text fully matches the reference pattern."""

    name = "regex"
    version = "1"

    async def score(self, completion: Completion) -> Score:
        """OK with `match` 1/0; POLICY_FAIL for an over-long output; INFRA_FAIL for a bad or missing pattern."""
        if not completion.reference:
            return infra_fail("request carries no reference pattern")
        try:
            pattern = re.compile(completion.reference)
        except re.error as err:
            return infra_fail(f"invalid reference pattern: {err}", trace={"pattern": clip(completion.reference, 200)})
        text = completion.text.strip()
        if len(text) > MAX_REGEX_TEXT:
            return policy_fail(f"output longer than {MAX_REGEX_TEXT} characters", {"match": 0.0})
        value = 1.0 if pattern.fullmatch(text) else 0.0
        return Score({"match": value}, value, RewardStatus.OK, {"pattern": clip(completion.reference, 200)})


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _normalized(text: str) -> str:
    return " ".join(text.split()).casefold().strip(" .")


class AnswerMatchReward:
    """A text answer in `<answer></answer>` tags against the reference (retrieval QA): half for
    the tags, half for the right answer in them, compared case- and space-insensitively.

    Components `format`, `correct` and `success` (correct and in tags), as `math_format`
    has for numbers, so a held-out success counts the same component.
    """

    name = "answer_match"
    version = "1"

    async def score(self, completion: Completion) -> Score:
        """OK with the shaped scalar; INFRA_FAIL without a reference."""
        if completion.reference is None:
            return infra_fail("request carries no reference")
        found = _ANSWER_TAG.findall(completion.text[-MAX_REGEX_TEXT:])
        if not found:
            return Score({"format": 0.0, "correct": 0.0, "success": 0.0}, 0.0, RewardStatus.OK, {"answer": ""})
        answer = found[-1]
        correct = 1.0 if _normalized(answer) == _normalized(completion.reference) else 0.0
        return Score(
            {"format": 1.0, "correct": correct, "success": correct},
            0.5 + 0.5 * correct,
            RewardStatus.OK,
            {"answer": clip(answer, 200)},
        )
