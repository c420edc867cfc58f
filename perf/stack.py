"""A whole rollout system as separate OS processes, for the chaos and soak drivers.

`Stack` starts its own Tansu broker and redis-server (plumbing/local_servers.py), creates
the topics and a verifier key, and runs each stage as its own `primerl` process in its
own process group: a router alone, an engine with `--no-router` (so the router can be
killed on its own), a verifier, a learner for one run id and an archiver. `Feeder`
publishes arithmetic prompt batches under admission control (as primerl/rl_loop.py's
feeder: at most `ahead` batches whose samples the learner has not consumed yet, read
from the learner's outcome log); `Observer` reads every topic but the chunks from the
beginning, without a consumer group, and keeps what it read (with arrival times) for
progress, recovery times and the final accounting.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from aiokafka import AIOKafkaConsumer, TopicPartition

from learners.outcome_log import read_outcomes
from plumbing.config import Config, load_config
from plumbing.dead_letters import dead_letter_sample_ids
from plumbing.kafka import Publisher, create_topics
from plumbing.local_servers import ServerProcess, start_broker, start_redis
from plumbing.security import server_env
from producers.arithmetic import ANSWER_GRAMMAR, arithmetic_requests
from schemas import DeadLetter, PolicyUpdate, PromptRequest, Reward, decode
from schemas.topics import COMPLETIONS, DLQ, POLICY, PROMPTS, REWARDS, ROUTED, TOPICS

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("router", "engine", "verifier", "learner", "archiver")
# The log line that says a (re)started stage has joined its group / is up.
READY = {
    "router": "router assigned [",
    "engine": "engine assigned [",
    "verifier": "verifier assigned [",
    "learner": "learner assigned [",
    "archiver": "archiver assigned",
}
OBSERVED = (PROMPTS.name, ROUTED.name, COMPLETIONS.name, REWARDS.name, POLICY.name, DLQ.name)
# plumbing/metrics.py logs the port it bound (every stage runs with --metrics-port 0).
METRICS_LINE = re.compile(r"metrics on http://[^:/\s]+:(\d+)/metrics")


def process_tree(pid: int) -> list[psutil.Process]:
    """`pid` and all its descendants (vLLM's engine core is a child of the engine)."""
    try:
        p = psutil.Process(pid)
        return [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_usage(pid: int) -> tuple[int, int, int]:
    """(RSS bytes, open fds, processes) summed over `pid`'s process tree."""
    rss = fds = n = 0
    for p in process_tree(pid):
        try:
            rss += p.memory_info().rss
            fds += p.num_fds()
            n += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return rss, fds, n


@dataclass
class Stage:
    """One stage process: started, SIGKILLed (its whole group) and restarted by the driver."""

    kind: str
    cmd: list[str]
    env: dict[str, str]
    log_dir: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    log_file: Path | None = None
    started_at: float = 0.0
    ready_at: float = 0.0
    expected_exit: bool = False  # set before we kill or stop it
    crashes: list[dict[str, Any]] = field(default_factory=list)  # exits nobody asked for

    def start(self) -> None:
        """Start a new process (own session = own process group)."""
        self.starts += 1
        self.log_file = self.log_dir / f"{self.kind}-{self.starts}.log"
        self.expected_exit = False
        self.ready_at = 0.0
        with open(self.log_file, "wb") as out:
            self.proc = subprocess.Popen(
                self.cmd,
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.started_at = time.time()

    def alive(self) -> bool:
        """The process has not exited."""
        return self.proc is not None and self.proc.poll() is None

    def check_ready(self) -> bool:
        """True once the current process's log shows its ready line (records when)."""
        if self.ready_at:
            return True
        if (
            self.log_file is not None
            and self.log_file.exists()
            and READY[self.kind] in self.log_file.read_text(errors="replace")
        ):
            self.ready_at = time.time()
            return True
        return False

    def metrics_url(self) -> str | None:
        """The current process's /metrics URL, from its log (None before it has bound the port)."""
        if self.log_file is None or not self.log_file.exists():
            return None
        found = METRICS_LINE.search(self.log_file.read_text(errors="replace"))
        return f"http://127.0.0.1:{found.group(1)}/metrics" if found else None

    def log_tail(self, lines: int = 25) -> str:
        """The end of the current process's log."""
        if self.log_file is None or not self.log_file.exists():
            return ""
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def kill(self) -> int:
        """SIGKILL the whole process group, and any descendant that left it; returns how many processes."""
        if self.proc is None:
            return 0
        self.expected_exit = True
        tree = process_tree(self.proc.pid)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for p in tree:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(30)
        psutil.wait_procs(tree, timeout=10)
        return len(tree)

    def stop(self, timeout_s: float = 90) -> int | None:
        """SIGTERM (graceful: commit, checkpoint), SIGKILL of the group after `timeout_s`; the exit code."""
        if self.proc is None:
            return None
        self.expected_exit = True
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0fs: SIGKILL", self.kind, timeout_s)
        code = self.proc.poll()
        tree = process_tree(self.proc.pid)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # leftovers of the group (engine core)
        except ProcessLookupError:
            pass
        psutil.wait_procs(tree, timeout=10)
        if code is None:
            self.proc.wait(30)
        return code


@dataclass
class StackSettings:
    """The shape of the system under test."""

    run_id: str
    work_dir: Path
    group_size: int = 4
    prompts_per_batch: int = 8
    groups_per_step: int = 8
    max_tokens: int = 12
    # > 0: every sample runs this long, past its answer, without the answer grammar (which
    # allows only EOS once the answer is closed); chaos runs use it so an engine kill lands
    # mid-sample and the redelivery resumes from the chunk log.
    min_tokens: int = 0
    max_policy_lag: int = 1
    group_timeout_s: float = 40.0
    engine_max_in_flight: int = 8
    seed: int = 0
    extra_env: dict[str, str] = field(default_factory=dict)
    # Without "router" the engine embeds its router (one process fewer, for short runs).
    kinds: tuple[str, ...] = KINDS


class Stack:
    """Servers + one process per stage kind; see the module doc."""

    def __init__(self, s: StackSettings) -> None:
        self.s = s
        self.state_dir = s.work_dir / "state"
        self.log_dir = s.work_dir / "logs"
        self.archive_root = s.work_dir / "runs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.broker: ServerProcess | None = None
        self.redis: ServerProcess | None = None
        self._broker_proc: subprocess.Popen[bytes] | None = None
        self._redis_proc: subprocess.Popen[bytes] | None = None
        self.stages: dict[str, Stage] = {}
        self.cfg: Config | None = None

    @property
    def learner_dir(self) -> Path:
        return self.state_dir / "learner" / self.s.run_id

    @property
    def outcomes_path(self) -> Path:
        return self.learner_dir / "outcomes.jsonl"

    @property
    def checkpoint_path(self) -> Path:
        return self.learner_dir / "learner.ckpt"

    async def start_servers(self) -> Config:
        """Broker + Redis on free ports, topics, a verifier key pair; the driver's Config."""
        from plumbing.infra import wait_kafka, wait_redis
        from plumbing.trust import generate_keypair

        self._broker_proc, self.broker = start_broker(self.log_dir)
        self._redis_proc, self.redis = start_redis(self.log_dir)
        bootstrap, redis_url = f"127.0.0.1:{self.broker.port}", f"redis://127.0.0.1:{self.redis.port}/0"
        self.cfg = load_config(
            state_dir=self.state_dir, kafka_bootstrap_servers=bootstrap, redis_url=redis_url, run_id=self.s.run_id
        )
        await wait_kafka(self.cfg)
        await wait_redis(self.cfg)
        await create_topics(self.cfg)
        if not list(self.cfg.keys_dir.glob("*.key")):  # before the learner reads its keyring
            generate_keypair(self.cfg.keys_dir)
        return self.cfg

    def stage_env(self) -> dict[str, str]:
        assert self.cfg is not None
        s = self.s
        return {
            **os.environ,
            "PYTHONPATH": str(ROOT) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""),
            **server_env(self.cfg),
            "PRIMERL_ENGINE__POLICY_RUN": s.run_id,
            "PRIMERL_ENGINE__MAX_IN_FLIGHT": str(s.engine_max_in_flight),
            "PRIMERL_LEARNER__GROUPS_PER_STEP": str(s.groups_per_step),
            "PRIMERL_LEARNER__GROUP_TIMEOUT_S": str(s.group_timeout_s),
            "PRIMERL_LEARNER__MAX_POLICY_LAG": str(s.max_policy_lag),
            "PRIMERL_LEARNER__SEED": str(s.seed),
            "PRIMERL_ARCHIVE__ROOT": str(self.archive_root),
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            **s.extra_env,
        }

    def build_stages(self) -> dict[str, Stage]:
        env = self.stage_env()
        base = [sys.executable, "-m", "primerl"]
        common = ["--state-dir", str(self.state_dir), "--metrics-port", "0"]
        embedded_router = "router" not in self.s.kinds
        cmds = {
            "router": [*base, "router", *common],
            "engine": [*base, "engine", *([] if embedded_router else ["--no-router"]), *common],
            "verifier": [*base, "verifier", *common],
            "learner": [*base, "learner", "--run-id", self.s.run_id, *common],
            "archiver": [*base, "archive", "--root", str(self.archive_root), *common],
        }
        self.stages = {k: Stage(k, cmds[k], env, self.log_dir) for k in KINDS if k in self.s.kinds}
        # torch's OpenMP threads spin against vLLM's busy engine core on 2 cores: one thread.
        if "learner" in self.stages:
            self.stages["learner"].env = {
                **env,
                "OMP_NUM_THREADS": os.environ.get("PRIMERL_CHAOS_LEARNER_THREADS", "1"),
            }
        return self.stages

    async def start_stages(self, timeout_s: float = 400) -> None:
        """Start every stage and wait until each is ready."""
        self.build_stages()
        for st in self.stages.values():
            st.start()
        deadline = time.monotonic() + timeout_s
        while not all([st.check_ready() for st in self.stages.values()]):  # a list: check (and time) every stage
            for st in self.stages.values():
                if not st.alive():
                    raise RuntimeError(
                        f"{st.kind} exited during start-up ({st.proc.returncode if st.proc else '?'}):\n{st.log_tail()}"
                    )
            if time.monotonic() > deadline:
                late = [k for k, st in self.stages.items() if not st.ready_at]
                raise TimeoutError(f"stages not ready after {timeout_s}s: {late}")
            await asyncio.sleep(0.5)

    # --- faults on the servers ----------------------------------------------------------
    def restart_redis(self) -> float:
        """SIGKILL redis-server and start an empty one on the same port; returns the seconds it took."""
        assert self.redis is not None and self._redis_proc is not None
        t0 = time.time()
        self._redis_proc.kill()
        self._redis_proc.wait(10)
        for _ in range(50):
            try:
                self._redis_proc, self.redis = start_redis(self.log_dir, port=self.redis.port)
                break
            except (RuntimeError, TimeoutError):
                time.sleep(0.2)  # the port may take a moment to free
        return time.time() - t0

    def pause_broker(self) -> None:
        assert self.broker is not None
        os.kill(self.broker.pid, signal.SIGSTOP)

    def resume_broker(self) -> None:
        assert self.broker is not None
        os.kill(self.broker.pid, signal.SIGCONT)

    def server_pids(self) -> dict[str, int]:
        out = {}
        if self.broker:
            out["broker"] = self.broker.pid
        if self.redis:
            out["redis"] = self.redis.pid
        return out

    def stop_all(self) -> dict[str, int | None]:
        """Stop every stage gracefully (the learner checkpoints; the archiver last, after the last policy record)."""
        codes: dict[str, int | None] = {}
        for kind in ("router", "engine", "verifier", "learner", "archiver"):
            st = self.stages.get(kind)
            if st is not None:
                codes[kind] = st.stop()
        return codes

    def metrics_targets(self) -> dict[str, str]:
        """Stage kind -> /metrics URL of every stage that has bound its port (perf/scrape.py's targets)."""
        urls = {kind: st.metrics_url() for kind, st in self.stages.items()}
        return {kind: url for kind, url in urls.items() if url}

    def stop_servers(self) -> None:
        for proc in (self._redis_proc, self._broker_proc):
            if proc is None:
                continue
            if proc is self._broker_proc and self.broker is not None:
                try:
                    os.kill(self.broker.pid, signal.SIGCONT)  # never leave it stopped
                except ProcessLookupError:
                    pass
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


class ObservedRecord:
    """One record read back by the observer."""

    __slots__ = ("topic", "partition", "offset", "timestamp", "arrived", "msg", "raw")

    def __init__(
        self, topic: str, partition: int, offset: int, timestamp: float, arrived: float, msg: Any, raw: bytes
    ) -> None:
        self.topic, self.partition, self.offset = topic, partition, offset
        self.timestamp, self.arrived, self.msg, self.raw = timestamp, arrived, msg, raw


class Observer:
    """Reads the observed topics from the beginning (no group) and keeps everything."""

    def __init__(self, cfg: Config, run_id: str) -> None:
        self.cfg = cfg
        self.run_id = run_id
        self.records: dict[str, list[ObservedRecord]] = defaultdict(list)
        self.last_arrival = time.time()
        self._task: asyncio.Task[None] | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self.completion_ids: set[str] = set()
        self.reward_completion_ids: set[str] = set()
        self.dead_sample_ids: dict[str, list[str]] = {}  # sample id -> ["stage:error_type", ...]

    async def start(self) -> None:
        from plumbing.kafka import common_kwargs

        self._consumer = AIOKafkaConsumer(
            **common_kwargs(self.cfg),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=self.cfg.kafka.fetch_max_wait_ms,  # a turn's first chunk is its TTFB
        )
        await self._consumer.start()
        tps = [TopicPartition(t, p) for t in OBSERVED for p in range(TOPICS[t].partitions)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        assert self._consumer is not None
        while True:
            try:
                batches = await self._consumer.getmany(timeout_ms=500, max_records=2000)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - the broker may be paused: keep reading
                log.warning("observer: %s", err)
                await asyncio.sleep(1)
                continue
            now = time.time()
            for tp, recs in batches.items():
                for r in recs:
                    self._add(tp, r, now)
            if batches:
                self.last_arrival = now

    def _add(self, tp: TopicPartition, r: Any, now: float) -> None:
        topic = TOPICS[tp.topic]
        try:
            msg = decode(r.value or b"", topic.message_type, list(r.headers or ()))
        except Exception:  # noqa: BLE001 - kept raw
            msg = None
        if msg is not None and tp.topic != DLQ.name and msg.run_id != self.run_id:
            return
        rec = ObservedRecord(tp.topic, tp.partition, r.offset, (r.timestamp or 0) / 1000, now, msg, r.value or b"")
        if tp.topic == DLQ.name:
            # decode() returns the topic's own type: a DeadLetter here (None: undecodable).
            ids = dead_letter_sample_ids(msg, self.run_id) if isinstance(msg, DeadLetter) else []
            if not isinstance(msg, DeadLetter) or not ids:
                self.records["dlq_other"].append(rec)
                return
            for i in ids:
                self.dead_sample_ids.setdefault(i, []).append(f"{msg.stage}:{msg.error_type}")
        elif tp.topic == COMPLETIONS.name and msg is not None:
            self.completion_ids.add(msg.id)
        elif tp.topic == REWARDS.name and isinstance(msg, Reward):
            self.reward_completion_ids.add(msg.completion_id)
        self.records[tp.topic].append(rec)

    async def wait_idle(self, idle_s: float = 4.0, timeout_s: float = 60) -> None:
        """Return once nothing new arrived for `idle_s` (the stages are stopped by then)."""
        deadline = time.monotonic() + timeout_s
        while time.time() - self.last_arrival < idle_s and time.monotonic() < deadline:
            await asyncio.sleep(0.5)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer:
            await self._consumer.stop()

    def first_after(self, topic: str, t: float) -> float | None:
        """Creation time of the first record on `topic` created after `t`."""
        times = [r.timestamp for r in self.records.get(topic, ()) if r.timestamp > t]
        return min(times) if times else None


def learner_consumed(path: Path) -> set[str]:
    """Sample ids the learner's outcome log says left its buffer (trained or dropped)."""
    out: set[str] = set()
    for line in read_outcomes(path):
        out.update(line.get("ids", ()))
    return out


class Feeder:
    """Publishes prompt batches of the arithmetic task under admission control."""

    def __init__(
        self,
        cfg: Config,
        s: StackSettings,
        outcomes: Path,
        observer: Observer,
        *,
        ahead: int | None = None,
        max_wait_s: float | None = None,
    ) -> None:
        self.cfg = cfg
        self.s = s
        self.outcomes = outcomes
        self.observer = observer
        self.ahead = s.max_policy_lag + 1 if ahead is None else ahead
        self.max_wait_s = 3 * s.group_timeout_s if max_wait_s is None else max_wait_s
        self.requests: list[PromptRequest] = []
        self.batches = 0
        self.forced = 0  # batches fed without the admission mark (the learner stalled)
        self.publish_errors = 0

    @property
    def per_batch(self) -> int:
        return self.s.prompts_per_batch * self.s.group_size

    @property
    def samples(self) -> int:
        return len(self.requests) * self.s.group_size

    def consumed(self) -> int:
        """Samples with an outcome: left the learner's buffer, or dead-lettered."""
        return len(learner_consumed(self.outcomes) | set(self.observer.dead_sample_ids))

    async def run(self, target_samples: int | None, stop: asyncio.Event) -> None:
        """Publish until `target_samples` (None: until `stop`)."""
        async with Publisher(self.cfg) as pub:
            while not stop.is_set() and (target_samples is None or self.samples < target_samples):
                waited = 0.0
                while self.consumed() < (self.batches - self.ahead + 1) * self.per_batch and not stop.is_set():
                    if waited > self.max_wait_s:
                        log.warning(
                            "admission: fewer samples consumed than published; feeding batch %d anyway", self.batches
                        )
                        self.forced += 1
                        break
                    await asyncio.sleep(0.5)
                    waited += 0.5
                if stop.is_set():
                    return
                reqs = arithmetic_requests(
                    self.s.run_id,
                    self.s.prompts_per_batch,
                    self.s.group_size,
                    seed=self.s.seed * 100_003 + self.batches,
                    max_tokens=self.s.max_tokens,
                    min_tokens=self.s.min_tokens,
                    grammar=None if self.s.min_tokens else ANSWER_GRAMMAR,
                )
                while True:
                    try:
                        await pub.publish_many(PROMPTS.name, [(r, r.routing_key()) for r in reqs])
                        break
                    except Exception as err:  # noqa: BLE001 - broker paused: the same batch again (same ids)
                        self.publish_errors += 1
                        log.warning("publishing batch %d failed (%s); retrying", self.batches, err)
                        await asyncio.sleep(1)
                self.requests.extend(reqs)
                self.batches += 1


def read_checkpoint_state(path: Path) -> Any | None:
    """The learner's checkpointed LearnerState (None when there is none)."""
    from learners.state import load_checkpoint

    got = load_checkpoint(path)
    return None if got is None else got[0]


def policy_versions(observer: Observer) -> list[int]:
    return sorted(r.msg.version for r in observer.records.get(POLICY.name, ()) if isinstance(r.msg, PolicyUpdate))
