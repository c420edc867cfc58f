"""compose.yaml, the Dockerfile and deploy/prometheus/ checked without a Docker engine.

- compose.yaml against the Compose Specification's JSON schema (vendored: deploy/schemas/README.md);
- deploy/prometheus/prometheus.yml with `promtool check config` (Debian's prometheus package);
- every topic, consumer group, port, command, env var, image and metric name in compose.yaml,
  prometheus.yml, the KEDA manifests and the dashboard against the code.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import typer.main
import yaml

import plumbing.kafka
from archiver.archiver import ARCHIVER_GROUP
from plumbing.config import Config
from primerl.cli import app
from router.router import ROUTER_GROUP
from schemas.topics import TOPICS
from verifier_workers.worker import VERIFIER_GROUP

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"
PROMETHEUS = yaml.safe_load(PROMETHEUS_YML.read_text())
KEDA = [d for p in sorted((ROOT / "deploy" / "keda").rglob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
IMAGE_REPO = "primerl-servekit"


def _source_constant(path: str, name: str) -> str:
    # Read from the source: importing engine_workers would import vLLM.
    m = re.search(rf'^{name} = "([^"]+)"', (ROOT / path).read_text(), re.M)
    assert m, f"{name} not found in {path}"
    return m.group(1)


ENGINE_GROUP = _source_constant("engine_workers/worker.py", "ENGINE_GROUP")
DEFERRAL_GROUP = _source_constant("engine_workers/deferral.py", "DEFERRAL_GROUP")
ENVHUB_GROUP = _source_constant("envhub/worker.py", "ENVHUB_GROUP")
# The consumer group each `primerl` command joins (learner: learner-<run id>, learners/worker.py).
COMMAND_GROUPS = {
    "router": {ROUTER_GROUP},
    "engine": {ENGINE_GROUP, DEFERRAL_GROUP},  # the deferral stage is embedded (engine.deferral_embedded)
    "verifier": {VERIFIER_GROUP},
    "envhub": {ENVHUB_GROUP},
    "learner": {"learner-"},
    "archive": {ARCHIVER_GROUP},
}


def _workers() -> dict[str, dict[str, Any]]:
    """Services that run a long-lived primerl stage (the ones built from the Dockerfile, less the topics job)."""
    return {n: s for n, s in SERVICES.items() if "build" in s and s["command"][0] in COMMAND_GROUPS}


def _env(service: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in (service.get("environment") or {}).items()}


def test_compose_matches_the_compose_specification() -> None:
    schema = json.loads((ROOT / "deploy" / "schemas" / "compose-spec.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    v = jsonschema.Draft7Validator(schema)
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in v.iter_errors(COMPOSE)]
    assert not errors, errors
    # The schema is strict enough to catch the mistakes that matter here.
    for broken in (
        {**COMPOSE, "service": {}},  # misspelt top-level key
        {**COMPOSE, "services": {**SERVICES, "router": {**SERVICES["router"], "profile": ["cpu"]}}},
        {**COMPOSE, "services": {**SERVICES, "redis": {**SERVICES["redis"], "healthcheck": {"interval": 5}}}},
    ):
        assert list(v.iter_errors(broken))


def test_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        print("SKIP reason: promtool is missing (Debian package prometheus; scripts/bootstrap.sh installs it)")
        pytest.skip("promtool is missing (apt-get install prometheus; scripts/bootstrap.sh installs it)")
    ok = subprocess.run([promtool, "check", "config", str(PROMETHEUS_YML)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # ... and promtool does refuse a broken one (a job listed twice).
    broken = tmp_path / "prometheus.yml"
    jobs = PROMETHEUS["scrape_configs"]
    broken.write_text(yaml.safe_dump({**PROMETHEUS, "scrape_configs": [*jobs, jobs[0]]}))
    assert subprocess.run([promtool, "check", "config", str(broken)], capture_output=True).returncode != 0


def test_three_kraft_brokers_replication_three_min_isr_two() -> None:
    brokers = {n: s for n, s in SERVICES.items() if s.get("image", "").startswith("apache/kafka:")}
    assert len(brokers) == 3
    envs = {n: _env(s) for n, s in brokers.items()}
    assert len({e["KAFKA_NODE_ID"] for e in envs.values()}) == 3
    assert len({e["CLUSTER_ID"] for e in envs.values()}) == 1
    voters = {f"{e['KAFKA_NODE_ID']}@{brokers[n]['hostname']}:9093" for n, e in envs.items()}
    for name, e in envs.items():
        assert e["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
        assert set(e["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")) == voters
        assert e["KAFKA_ADVERTISED_LISTENERS"] == f"PLAINTEXT://{brokers[name]['hostname']}:9092"
        assert brokers[name]["hostname"] == name  # what other services dial
        assert e["KAFKA_DEFAULT_REPLICATION_FACTOR"] == "3" and e["KAFKA_MIN_INSYNC_REPLICAS"] == "2"
        assert e["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "3"  # committed offsets survive a broker too
        assert e["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    bootstrap = ",".join(f"{n}:9092" for n in sorted(brokers))
    for name, s in SERVICES.items():
        if "KAFKA_BOOTSTRAP_SERVERS" in _env(s):
            assert _env(s)["KAFKA_BOOTSTRAP_SERVERS"] == bootstrap, name


def test_the_topics_job_creates_the_registry_replicated(monkeypatch: pytest.MonkeyPatch) -> None:
    job = SERVICES["topics"]
    assert job["command"] == ["infra", "up"]  # ensure_infra -> plumbing.kafka.create_topics(TOPICS)
    assert job["restart"] == "no"
    for name, s in _workers().items():
        assert s["depends_on"]["topics"] == {"condition": "service_completed_successfully"}, name
    for key, value in _env(job).items():
        monkeypatch.setenv(key, value)
    cfg = Config()
    assert cfg.kafka.topic_replication_factor == 3 and cfg.kafka.topic_min_insync_replicas == 2
    created: list[Any] = []

    class Admin:
        def __init__(self, **kwargs: Any) -> None:
            assert kwargs["bootstrap_servers"] == cfg.bootstrap

        async def start(self) -> None: ...
        async def close(self) -> None: ...
        async def list_topics(self) -> list[str]:
            return ["rollout.policy"]

        async def create_topics(self, topics: list[Any]) -> None:
            created.extend(topics)

    monkeypatch.setattr(plumbing.kafka, "AIOKafkaAdminClient", Admin)
    names = asyncio.run(plumbing.kafka.create_topics(cfg))
    assert set(names) == set(TOPICS) - {"rollout.policy"}
    for t in created:
        assert t.num_partitions == TOPICS[t.name].partitions
        assert t.replication_factor == 3 and t.topic_configs == {"min.insync.replicas": "2"}


def test_min_isr_above_replication_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRIMERL_KAFKA__TOPIC_MIN_INSYNC_REPLICAS", "2")
    with pytest.raises(ValueError, match="topic_min_insync_replicas"):
        Config()


def _dockerfile_targets() -> set[str]:
    return set(re.findall(r"^FROM \S+ AS (\S+)$", (ROOT / "Dockerfile").read_text(), re.M))


def test_one_dockerfile_one_target_and_image_per_role() -> None:
    targets = _dockerfile_targets()
    extras = set(
        re.findall(r'pip install [^\n]*"?\.\[([a-z-]+)\]', (ROOT / "Dockerfile").read_text())
    )  # each target installs its own role's extra
    assert {"engine-cpu", "engine-gpu", "verifier", "envhub", "learner", "ops"} <= extras <= targets
    built = {n: s for n, s in SERVICES.items() if "build" in s}
    for name, s in built.items():
        assert s["build"]["target"] in targets, name
        assert s["image"] == f"{IMAGE_REPO}:{s['build']['target']}", name
    engines = {n: s for n, s in built.items() if s["command"][0] == "engine"}
    assert {s["build"]["target"] for s in engines.values()} == {"engine-cpu", "engine-gpu"}
    assert {p for s in engines.values() for p in s["profiles"]} == {"cpu", "gpu"}
    images = {s["image"]: s for s in built.values()}
    for d in KEDA:
        if d.get("kind") != "Deployment":
            continue
        c = d["spec"]["template"]["spec"]["containers"][0]
        assert c["image"] in images, f"{d['metadata']['name']}: {c['image']} is not built by compose.yaml"
        assert images[c["image"]]["command"][0] == c["command"][1]  # the image of that role


def _command_options(name: str) -> set[str]:
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]  # a group: typer's own click
    assert name in commands, f"primerl has no command {name!r}"
    cmd = commands[name]
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}


def test_every_service_command_is_a_primerl_command_with_those_options() -> None:
    for name, s in SERVICES.items():
        if "build" not in s:
            continue
        command = s["command"]
        if command[0] == "infra":
            continue  # checked by the topics test
        opts = _command_options(command[0])
        for arg in command[1:]:
            if arg.startswith("--"):
                assert arg in opts, f"{name}: primerl {command[0]} has no {arg}"


def test_every_consumer_group_has_a_service_and_a_scrape_job() -> None:
    in_code = set(re.findall(r'^[A-Z_]+_GROUP = "([^"]+)"', _all_source(), re.M)) | {"learner-"}
    assert in_code == set().union(*COMMAND_GROUPS.values()), "a consumer group compose.yaml does not run"
    jobs = {j["job_name"]: j for j in PROMETHEUS["scrape_configs"]}
    scraped: dict[str, tuple[str, int]] = {}
    for job in jobs.values():
        for sd in job.get("dns_sd_configs", []):
            for target in sd["names"]:
                assert target in SERVICES, f"job {job['job_name']} scrapes {target}, no such service"
                scraped[target] = (job["job_name"], sd["port"])
    workers = _workers()
    assert {s["command"][0] for s in workers.values()} == set(COMMAND_GROUPS)
    for name, s in workers.items():
        assert name in scraped, f"{name} ({s['command'][0]}) is not scraped"
        port = int(_env(s)["PRIMERL_METRICS__PORT"])
        assert scraped[name][1] == port and _env(s)["PRIMERL_METRICS__HOST"] == "0.0.0.0"
        assert s["command"][s["command"].index("--metrics-port") + 1] == str(port)
        assert str(port) in s["expose"]
    for d in KEDA:
        if d.get("kind") == "Deployment":
            pod = d["spec"]["template"]
            c = pod["spec"]["containers"][0]
            port = c["command"][c["command"].index("--metrics-port") + 1]
            assert pod["metadata"]["annotations"]["prometheus.io/port"] == port
            assert [p["containerPort"] for p in c["ports"]] == [int(port)]
            assert {e["name"]: e.get("value") for e in c["env"]}["PRIMERL_METRICS__HOST"] == "0.0.0.0"


def test_every_env_var_is_a_config_field_and_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, s in SERVICES.items():
        if "build" not in s:
            continue
        env = _env(s)
        for key in env:
            if not key.startswith("PRIMERL_"):
                assert key in ("KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL", "VLLM_CPU_KVCACHE_SPACE"), f"{name}: {key}"
                continue
            model: Any = Config
            *sections, field = key.removeprefix("PRIMERL_").lower().split("__")
            for part in sections:
                model = model.model_fields[part].annotation
            assert field in model.model_fields, f"{name}: {key} names no config field"
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            cfg = Config()  # types and bounds validated as a worker would load them
        assert cfg.bootstrap and cfg.redis_url.startswith("redis://redis:")


def test_stateful_workers_share_keys_weights_and_the_model_cache() -> None:
    # Verifier keys are the learner's keyring, engine keys the verifier's, learner weights the engines'.
    for name, s in _workers().items():
        assert "primerl-state:/var/lib/primerl" in s["volumes"], name
        assert _env(s)["PRIMERL_STATE_DIR"] == "/var/lib/primerl", name
        assert "models:/home/primerl/.cache/primerl" in s["volumes"], name  # plumbing/model_store.py's cache
    # A named volume takes the owner of the image folder it is mounted on: each must be made in the
    # Dockerfile for the non-root user, or the worker cannot write its keys or model cache.
    made = re.search(r"mkdir -p ([^\\&\n]+)", (ROOT / "Dockerfile").read_text())
    assert made
    for s in _workers().values():
        for volume in s["volumes"]:
            assert volume.split(":")[1] in made.group(1).split(), volume


def test_grafana_mounts_what_its_provisioning_names() -> None:
    g = SERVICES["grafana"]
    boards = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/primerl.yaml").read_text())
    ds = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yaml").read_text())
    mounts = {v.split(":")[1]: v.split(":")[0] for v in g["volumes"] if v.startswith("./")}
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    dash_dir = boards["providers"][0]["options"]["path"]
    assert mounts[f"{dash_dir}/primerl.json"] == "./deploy/grafana/primerl.json"
    host, port = re.match(r"http://([^:/]+):(\d+)", ds["datasources"][0]["url"]).groups()  # type: ignore[union-attr]
    assert host in SERVICES and f":{port}" in " ".join(SERVICES[host]["ports"])
    prom_mounts = {v.split(":")[1]: v.split(":")[0] for v in SERVICES[host]["volumes"] if v.startswith("./")}
    assert prom_mounts["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus/prometheus.yml"


def _all_source() -> str:
    dirs = ("plumbing", "engine_workers", "verifier_workers", "envhub", "router", "learners", "archiver", "operations")
    return "\n".join(p.read_text() for d in dirs for p in sorted((ROOT / d).rglob("*.py")))


def _deploy_texts() -> dict[str, str]:
    files = [ROOT / "compose.yaml", PROMETHEUS_YML, ROOT / "deploy" / "grafana" / "primerl.json"]
    files += sorted((ROOT / "deploy" / "keda").rglob("*.yaml"))
    return {str(p.relative_to(ROOT)): p.read_text() for p in files}


def test_every_topic_and_metric_named_in_deploy_files_exists_in_the_code() -> None:
    registered = set(re.findall(r'"(primerl_[a-z0-9_]+)"', _all_source()))
    suffixes = ("_total", "_bucket", "_sum", "_count", "_created")
    seen_metrics = seen_topics = 0
    for path, text in _deploy_texts().items():
        for metric in set(re.findall(r"\b(primerl_[a-z0-9_]+)\b", text)):
            seen_metrics += 1
            base = next((metric.removesuffix(s) for s in suffixes if metric.endswith(s)), metric)
            assert metric in registered or base in registered, f"{path}: {metric} is not a metric the code exports"
        for topic in set(re.findall(r"\brollout\.[a-z][a-z-]*", text)):
            seen_topics += 1
            assert topic in TOPICS, f"{path}: {topic} is not in schemas/topics.py"
    assert seen_metrics >= 20 and seen_topics >= 2  # the scan did read the dashboard and the KEDA triggers
