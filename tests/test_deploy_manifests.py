"""The KEDA manifests in deploy/, checked offline: a JSON schema of the ScaledObject fields
KEDA requires, and names that must match the code (topics, consumer groups, metrics,
Deployments)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from schemas.topics import TOPICS
from verifier_workers.worker import VERIFIER_GROUP

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SCHEMA = json.loads((DEPLOY / "schemas" / "scaledobject.schema.json").read_text())


def _engine_group() -> str:
    # Read from the source: importing engine_workers.worker would import vLLM.
    m = re.search(r'^ENGINE_GROUP = "([^"]+)"', (ROOT / "engine_workers" / "worker.py").read_text(), re.M)
    assert m, "ENGINE_GROUP not found in engine_workers/worker.py"
    return m.group(1)


# Which topic each scaled group consumes, as the workers subscribe (engine_workers/worker.py,
# verifier_workers/worker.py).
GROUP_TOPIC = {_engine_group(): "rollout.routed", VERIFIER_GROUP: "rollout.completions"}


def _docs() -> list[tuple[Path, dict]]:
    out = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        out.extend((path, d) for d in yaml.safe_load_all(path.read_text()) if d)
    return out


def _scaled_objects() -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in _docs() if d.get("kind") == "ScaledObject"]


def test_the_schema_is_a_valid_schema_and_rejects_what_keda_rejects() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    good = _scaled_objects()[0][1]
    v = jsonschema.Draft202012Validator(SCHEMA)
    assert not list(v.iter_errors(good))
    broken = json.loads(json.dumps(good))
    del broken["spec"]["scaleTargetRef"]
    assert list(v.iter_errors(broken))
    broken = json.loads(json.dumps(good))
    broken["spec"]["triggers"][0]["metadata"].pop(
        next(iter({"topic", "query"} & set(good["spec"]["triggers"][0]["metadata"])))
    )
    assert list(v.iter_errors(broken))
    broken = json.loads(json.dumps(good))
    broken["spec"]["triggers"][0]["metadata"][
        "threshold" if "query" in good["spec"]["triggers"][0]["metadata"] else "lagThreshold"
    ] = 32
    assert list(v.iter_errors(broken))  # KEDA wants strings in trigger metadata


@pytest.mark.parametrize(
    "path,obj",
    _scaled_objects(),
    ids=lambda x: x.get("metadata", {}).get("name", "") if isinstance(x, dict) else x.name,
)
def test_scaled_object(path: Path, obj: dict) -> None:
    errors = [
        f"{'/'.join(map(str, e.path))}: {e.message}" for e in jsonschema.Draft202012Validator(SCHEMA).iter_errors(obj)
    ]
    assert not errors, f"{path}: {errors}"
    deployments = {d["metadata"]["name"]: d for _, d in _docs() if d.get("kind") == "Deployment"}
    target = deployments.get(obj["spec"]["scaleTargetRef"]["name"])
    assert target is not None, f"{path}: no Deployment named {obj['spec']['scaleTargetRef']['name']} in deploy/"
    command = target["spec"]["template"]["spec"]["containers"][0]["command"]
    role = command[1]
    assert command[0] == "primerl" and role in ("engine", "verifier")
    group = role  # the worker's group id is its role (ENGINE_GROUP, VERIFIER_GROUP)
    assert group in GROUP_TOPIC
    topic = TOPICS[GROUP_TOPIC[group]]
    assert obj["spec"]["maxReplicaCount"] <= topic.partitions, "more replicas than partitions would idle"
    assert obj["spec"].get("minReplicaCount", 0) >= 1, (
        "a group with no member never commits, so lag never shows the work"
    )
    for trigger in obj["spec"]["triggers"]:
        meta = trigger["metadata"]
        if trigger["type"] == "kafka":
            assert meta["consumerGroup"] == group and meta["topic"] == topic.name
        elif trigger["type"] == "prometheus":
            assert f'group="{group}"' in meta["query"]
            for metric in re.findall(r"\b(primerl_[a-z_]+)\b", meta["query"]):
                sources = "\n".join(
                    p.read_text()
                    for d in ("plumbing", "engine_workers", "verifier_workers")
                    for p in (ROOT / d).rglob("*.py")
                )
                assert f'"{metric}"' in sources, f"{metric} is not a metric the code exports"
        else:
            pytest.fail(f"unexpected trigger type {trigger['type']}")


def test_both_variants_cover_both_scaled_roles() -> None:
    by_type: dict[str, set[str]] = {}
    for _, obj in _scaled_objects():
        for t in obj["spec"]["triggers"]:
            by_type.setdefault(t["type"], set()).add(obj["spec"]["scaleTargetRef"]["name"])
    assert by_type == {
        "kafka": {"primerl-engine", "primerl-verifier"},
        "prometheus": {"primerl-engine", "primerl-verifier"},
    }
