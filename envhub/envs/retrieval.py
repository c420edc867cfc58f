"""Env `retrieval_qa`: questions about fictional islands, answered by reading the local corpus.

Task "answer_match": the reference is the fact as the page writes it (a name, or digits),
compared with the answer in tags, case- and space-insensitively. The held-out islands are never
asked about in training, so a held-out score measures reading, not memorized pages.
"""

from __future__ import annotations

from envhub.connectors import Connector
from envhub.connectors.browser import Browser
from envhub.corpus import ISLANDS, Island
from envhub.envs import Split, ToolEnv, draw
from envhub.protocol import EnvContext, Reset
from schemas.prompts import ChatMessage, Grammar, GrammarKind
from schemas.sessions import ToolTrace

SYSTEM = """You answer questions about islands by reading an island wiki with a browser tool. To open the \
page of an island, write <tool name="browser">/wiki/NAME</tool> and stop; to search, put words instead of \
a path. The page text comes back in the next message. Give the final answer exactly as the page writes \
it, as <answer>TEXT</answer>.

Example:
Question: What is the capital of Examplia?
You: <tool name="browser">/wiki/Examplia</tool>
Browser: Examplia is an island in the Saltwind Sea. Its capital is Portwell.
You: <answer>Portwell</answer>"""

# One browser call (a wiki path or search words) or one answer per turn, as the engine enforces.
_CALL = r'<tool name="browser">(/wiki/[A-Za-z_-]{1,40}|[A-Za-z0-9 ]{1,60})</tool>'
GRAMMAR = Grammar(GrammarKind.REGEX, rf"({_CALL}|<answer>[A-Za-z0-9 .,'-]{{1,60}}</answer>)")

# question kind -> (question template, the island's fact that answers it)
QUESTIONS: dict[str, tuple[str, str]] = {
    "capital": ("What is the capital of {name}?", "capital"),
    "founded": ("In what year was {name} founded?", "founded"),
    "population": ("What is the population of {name}?", "population"),
    "peak": ("What is the highest point of {name}?", "peak"),
}


def heldout_island(index: int) -> bool:
    """Every fifth island (8 of 40) is held out."""
    return index % 5 == 0


def instance(island: Island, kind: str) -> dict[str, str]:
    template, fact = QUESTIONS[kind]
    return {"question": template.format(name=island.name), "answer": str(getattr(island, fact)), "page": island.name}


def instances(split: Split, n: int, seed: int) -> list[dict[str, str]]:
    """`n` questions of `split` (repeating the pool when `n` exceeds it); the splits share no island."""
    pool = [
        instance(island, kind)
        for i, island in enumerate(ISLANDS)
        if heldout_island(i) == (split == "heldout")
        for kind in QUESTIONS
    ]
    return draw(pool, n, seed)


class RetrievalEnv(ToolEnv):
    name = "retrieval_qa"
    tools = ("browser",)
    example = '<tool name="browser">/wiki/Examplia</tool>'

    def __init__(self, ctx: EnvContext, browser: Connector | None = None) -> None:
        super().__init__(ctx, [browser or Browser(ctx)])

    def components(self, calls: list[ToolTrace], malformed: int) -> dict[str, float]:
        fetched = [c for c in calls if c.tool == "browser"]
        return {
            "fetches": float(len(fetched)),
            "fetch_ok": float(sum(c.ok for c in fetched)),
            "tool_errors": float(sum(not c.ok for c in calls)),
            "malformed_calls": float(malformed),
        }

    def reset(self, instance: dict[str, str]) -> Reset:
        return Reset(
            messages=[ChatMessage("system", SYSTEM), ChatMessage("user", f"Question: {instance['question']}")],
            reference=instance["answer"],
            task="answer_match",
            grammar=GRAMMAR,
        )

    def instances(self, split: Split, n: int, seed: int) -> list[dict[str, str]]:
        return instances(split, n, seed)


def make(ctx: EnvContext) -> RetrievalEnv:
    """The entry point's factory."""
    return RetrievalEnv(ctx)
