"""Writes deploy/acl/kafka-acls.sh and deploy/acl/redis-users.acl from schemas/access.py:
`python scripts/render_acls.py [OUT_DIR]` (tests/test_access_map.py checks they are current)."""

from __future__ import annotations

import sys
from pathlib import Path

from schemas.access import PRINCIPALS, Principal

ROOT = Path(__file__).resolve().parents[1]
KAFKA_FILE = "kafka-acls.sh"
REDIS_FILE = "redis-users.acl"


def password_var(p: Principal) -> str:
    """The environment variable holding `p`'s Redis password when the ACL file is rendered (envsubst)."""
    return "REDIS_PASSWORD_" + p.name.upper().replace("-", "_")


def kafka_lines(p: Principal) -> list[str]:
    """kafka-acls.sh invocations granting `p` its map, nothing else (ACLs deny by default)."""
    add = f'kafka-acls.sh "${{ADMIN[@]}}" --add --allow-principal User:{p.name}'
    out = []
    for topic in sorted(set(p.reads) | set(p.writes)):
        ops = (["Read"] if topic in p.reads else []) + (["Write"] if topic in p.writes else []) + ["Describe"]
        out.append(f"{add} {' '.join('--operation ' + o for o in ops)} --topic {topic}")
    for group in p.groups:
        prefixed = " --resource-pattern-type prefixed" if group.endswith("-") else ""
        out.append(f"{add} --operation Read --operation Describe{prefixed} --group {group}")
    if p.create_topics:
        out.append(f"{add} --operation Create --operation Describe --cluster")
    if p.describe_groups:
        out.append(f"{add} --operation Describe --group '*'")
    return out


def redis_line(p: Principal) -> str | None:
    """The ACL file line of `p` (None: it uses no Redis, so it gets no user at all)."""
    if not (p.redis_read or p.redis_write):
        return None
    patterns = [f"%R~{k}*" for k in p.redis_read if k not in p.redis_write] + [f"~{k}*" for k in p.redis_write]
    # Commands by category: data reads/writes, Lua scripts (the ledger and the index use
    # EVALSHA), MULTI pipelines, connection setup; never the dangerous ones (KEYS, FLUSHALL, CONFIG, ...).
    commands = "-@all +@connection +@read +@write +@scripting +@transaction -@dangerous"
    return f"user {p.name} on >${{{password_var(p)}}} resetkeys {' '.join(patterns)} resetchannels {commands}"


def render_kafka() -> str:
    out = [
        "#!/usr/bin/env bash",
        "# Least-privilege Kafka ACLs of every primerl stage (generated from schemas/access.py by",
        "# scripts/render_acls.py; do not edit). For Apache Kafka with an authorizer, e.g. KRaft:",
        "#   authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "# Usage: BOOTSTRAP=host:9093 ADMIN_CONFIG=admin.properties deploy/acl/kafka-acls.sh",
        "# Each stage logs in as User:<name> (kafka.sasl_username), e.g. with SCRAM:",
        "#   kafka-configs.sh --bootstrap-server $BOOTSTRAP --command-config $ADMIN_CONFIG --alter \\",
        "#     --add-config 'SCRAM-SHA-512=[password=...]' --entity-type users --entity-name primerl-engine",
        "set -euo pipefail",
        'ADMIN=(--bootstrap-server "${BOOTSTRAP:?host:port of the broker}" '
        '--command-config "${ADMIN_CONFIG:?client properties of an admin}")',
    ]
    for p in PRINCIPALS:
        out += ["", f"# {p.name}", *kafka_lines(p)]
    return "\n".join(out) + "\n"


def render_redis() -> str:
    # No comments: redis-server refuses an ACL file with any line that is not a `user` line
    # (7.0.15: "should start with user keyword"); deploy/acl/README.md says how to use it.
    lines = ["user default off", *(line for p in PRINCIPALS if (line := redis_line(p)) is not None)]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Write both files to argv[1] (default: deploy/acl)."""
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "deploy" / "acl"
    out.mkdir(parents=True, exist_ok=True)
    (out / KAFKA_FILE).write_text(render_kafka())
    (out / KAFKA_FILE).chmod(0o755)
    (out / REDIS_FILE).write_text(render_redis())


if __name__ == "__main__":
    main()
