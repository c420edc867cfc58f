"""Prometheus metrics of a verifier worker."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class VerifierMetrics:
    """Rewards by status and verifier, scoring latency, sandbox kills, signatures."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.rewards = Counter("primerl_verifier_rewards", "Rewards published", ["task", "status"], registry=registry)
        self.scoring_seconds = Histogram(
            "primerl_verifier_scoring_seconds",
            "Time to score one completion",
            ["task"],
            buckets=(0.001, 0.005, 0.02, 0.1, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        self.sandbox_kills = Counter(
            "primerl_verifier_sandbox_kills", "Candidate programs stopped by the sandbox", ["reason"], registry=registry
        )
        self.signed = Counter("primerl_verifier_signed", "Rewards signed", registry=registry)
        self.rejected = Counter(
            "primerl_verifier_completions_rejected",
            "Completions refused (dead-lettered) for custody: engine signature, text/token mismatch, "
            "a trajectory wrapper's env hub signature (reasons trajectory_*)",
            ["reason"],
            registry=registry,
        )
        self.session_turns = Counter(
            "primerl_verifier_session_turns_skipped",
            "Session turns on rollout.completions, not scored (their session is, from rollout.trajectories)",
            registry=registry,
        )
        self.trajectories = Counter(
            "primerl_verifier_trajectories", "Finished sessions scored", ["done_reason"], registry=registry
        )
        self.duplicates = Counter(
            "primerl_verifier_duplicates", "Redelivered completions already rewarded", registry=registry
        )
