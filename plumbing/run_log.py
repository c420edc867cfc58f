"""The on-disk run log: one Parquet schema for every topic, record <-> row, file naming, manifests.

Layout (written by the archiver, read by replays):

    <root>/<run_id>/<topic>/p<partition>-<first offset>-<last offset>.parquet
    <root>/<run_id>/manifest.json
    <root>/_undecodable/<topic>/...   records that did not decode (raw bytes + the error)

A file named `pP-A-B` holds every record of that run among offsets A..B of partition P
(the archiver flushed that offset range at once), so "is offset O of run R archived"
is "does a file of R cover O": restarts never write a record twice.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeGuard

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
from aiokafka.structs import ConsumerRecord

from schemas import Completion, DeadLetter, Message, PolicyUpdate, PromptRequest, Reward, decode
from schemas.topics import COMPLETIONS, POLICY, PROMPTS, REWARDS, TOPICS

UNDECODABLE = "_undecodable"

SCHEMA = pa.schema(
    [
        ("topic", pa.string()),
        ("partition", pa.int32()),
        ("offset", pa.int64()),
        ("timestamp_ms", pa.int64()),
        ("key", pa.binary()),
        ("headers", pa.list_(pa.struct([("name", pa.string()), ("value", pa.binary())]))),
        ("value", pa.binary()),  # the record's bytes as they were on the wire
        ("error", pa.string()),  # why it did not decode; null when it did
        # Decoded key fields (null where the message type has no such field).
        ("kind", pa.string()),
        ("id", pa.string()),
        ("run_id", pa.string()),
        ("created_at", pa.float64()),
        ("request_id", pa.string()),
        ("group_id", pa.string()),
        ("completion_id", pa.string()),
        ("sample_index", pa.int32()),
        ("policy_version", pa.int64()),
        ("task", pa.string()),
        ("verifier_version", pa.string()),
        ("key_id", pa.string()),
        ("scalar", pa.float64()),
        ("status", pa.string()),
        ("stage", pa.string()),
    ]
)

_FILE = re.compile(r"^p(?P<partition>\d+)-(?P<first>\d+)-(?P<last>\d+)\.parquet$")
_SAFE = re.compile(r"[^A-Za-z0-9._=-]")


def run_dir_name(run_id: str) -> str:
    """A run id as a folder name (no path separators, never `.`/`..` or hidden)."""
    name = _SAFE.sub("_", run_id)[:200] or "_empty"
    return "_" + name if name.startswith(".") else name


def file_name(partition: int, first: int, last: int) -> str:
    """The file of a flushed offset range of one partition."""
    return f"p{partition}-{first:012d}-{last:012d}.parquet"


def parse_file_name(name: str) -> tuple[int, int, int] | None:
    """(partition, first, last) of a run-log file name, None for other files."""
    m = _FILE.match(name)
    return (int(m["partition"]), int(m["first"]), int(m["last"])) if m else None


def record_row(record: ConsumerRecord) -> tuple[str, dict[str, Any]]:
    """(run id, row) of a consumed record; a record that does not decode as its topic's
    type goes to the `_undecodable` run with the error, its bytes kept as they were."""
    value = record.value or b""
    headers = [(k, bytes(v)) for k, v in (record.headers or ())]
    row: dict[str, Any] = {
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "timestamp_ms": record.timestamp,
        "key": record.key,
        "headers": [{"name": k, "value": v} for k, v in headers],
        "value": value,
        "error": None,
    }
    topic = TOPICS.get(record.topic)
    if topic is None:
        row["error"] = f"topic {record.topic!r} is not in the registry"
        return UNDECODABLE, row
    try:
        msg = decode(value, topic.message_type, headers)
    except Exception as err:  # noqa: BLE001 - DecodeError, a __post_init__ check, or whatever hostile bytes make a decoder raise
        row["error"] = f"{type(err).__name__}: {err}"
        return UNDECODABLE, row
    row.update(key_fields(msg))
    return msg.run_id, row


_INT_COLUMNS = {"sample_index": 2**31, "policy_version": 2**63}  # column -> bound of its signed type


def key_fields(msg: Message) -> dict[str, Any]:
    """The columns a replay or a person filters on, from a decoded message.

    A value its column cannot hold (a sample index of 2**32, a policy version of 2**64 - 1:
    valid msgpack ints) is left null; the raw bytes in `value` keep it whole.
    """
    out = _key_fields(msg)
    for name, bound in _INT_COLUMNS.items():
        v = out.get(name)
        if v is not None and not -bound <= v < bound:
            out[name] = None
    return out


def _key_fields(msg: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": type(msg).__name__, "id": msg.id, "run_id": msg.run_id, "created_at": msg.created_at}
    if isinstance(msg, PromptRequest):
        out.update(request_id=msg.id, group_id=msg.group_id, task=msg.task)
    elif isinstance(msg, Completion):
        out.update(
            request_id=msg.request_id,
            group_id=msg.group_id,
            completion_id=msg.id,
            sample_index=msg.sample_index,
            policy_version=msg.policy_version,
            task=msg.task,
        )
    elif isinstance(msg, Reward):
        out.update(
            request_id=msg.request_id,
            group_id=msg.group_id,
            completion_id=msg.completion_id,
            policy_version=msg.policy_version,
            verifier_version=msg.verifier_version,
            key_id=msg.key_id,
            scalar=msg.scalar,
            status=msg.status.value,
        )
    elif isinstance(msg, PolicyUpdate):
        out.update(policy_version=msg.version)
    elif isinstance(msg, DeadLetter):
        out.update(stage=msg.stage)
    return out


def write_atomically(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write `rows` as a Parquet file that either exists whole or not at all (temp, fsync, rename, fsync dir)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    with open(tmp, "wb") as f:
        pq.write_table(table, f, compression="zstd")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_json_atomically(path: Path, obj: object) -> None:
    """The same for a JSON document (manifests, reports)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run_files(run_path: Path, topic: str) -> list[Path]:
    """The run log's files of one topic, in partition and offset order."""
    files = [(parse_file_name(p.name), p) for p in (run_path / topic).glob("p*.parquet")]
    return [p for key, p in sorted((k, p) for k, p in files if k is not None)]


def read_topic(run_path: Path, topic: str, columns: list[str] | None = None) -> pa.Table:
    """Every archived row of one topic of a run (empty table when none)."""
    files = run_files(run_path, topic)
    if not files:
        return SCHEMA.empty_table().select(columns) if columns else SCHEMA.empty_table()
    return pa.concat_tables(pq.read_table(f, columns=columns, schema=SCHEMA) for f in files)


def read_messages(run_path: Path, topic: str) -> Iterator[tuple[dict[str, Any], Message]]:
    """(position fields, decoded message) of every decodable archived record of a topic,
    decoded from the archived raw bytes, in the order the broker appended them across
    partitions (record timestamp, then partition and offset): the order a consumer of
    the whole topic saw them, as near as the log can tell."""
    table = read_topic(run_path, topic, ["partition", "offset", "timestamp_ms", "headers", "value", "error"])
    msg_type = TOPICS[topic].message_type
    rows = sorted(table.to_pylist(), key=lambda r: (r["timestamp_ms"] or 0, r["partition"], r["offset"]))
    for row in rows:
        if row["error"] is not None:
            continue
        headers = [(h["name"], h["value"]) for h in row["headers"] or ()]
        position = {"partition": row["partition"], "offset": row["offset"], "timestamp_ms": row["timestamp_ms"]}
        yield position, decode(row["value"], msg_type, headers)


def file_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What a manifest keeps about one file (summed over files for the run's totals)."""
    return {
        "records": len(rows),
        "undecodable": sum(r["error"] is not None for r in rows),
        "policy_versions": sorted({r["policy_version"] for r in rows if r.get("policy_version") is not None}),
        "key_ids": sorted({r["key_id"] for r in rows if r.get("key_id")}),
        "verifier_versions": sorted({r["verifier_version"] for r in rows if r.get("verifier_version")}),
        "tasks": sorted({r["task"] for r in rows if r.get("task")}),
        # Finite times only: json.dump writes NaN/Infinity, which no JSON reader (the next
        # load_manifest) accepts.
        "first_created_at": min((t for r in rows if _finite(t := r.get("created_at"))), default=None),
        "last_created_at": max((t for r in rows if _finite(t := r.get("created_at"))), default=None),
    }


def _finite(x: float | None) -> TypeGuard[float]:
    return x is not None and math.isfinite(x)


class Manifest(msgspec.Struct, kw_only=True):
    """manifest.json of a run: per-file stats (keyed by file, so re-adding one is a no-op) and totals."""

    run_id: str
    model: str = ""
    config: dict[str, Any] = {}
    files: dict[str, dict[str, Any]] = {}
    messages_per_topic: dict[str, int] = {}
    undecodable: int = 0
    policy_versions: list[int] = []
    signing_key_ids: list[str] = []
    verifier_versions: list[str] = []
    tasks: list[str] = []
    first_created_at: float | None = None
    last_created_at: float | None = None

    def add(self, rel_path: str, topic: str, stats: dict[str, Any]) -> None:
        """Account for one written file and recompute the totals."""
        self.files[rel_path] = {"topic": topic, **stats}
        counts: dict[str, int] = {}
        pv: set[int] = set()
        keys: set[str] = set()
        vv: set[str] = set()
        tasks: set[str] = set()
        firsts, lasts = [], []
        self.undecodable = 0
        for f in self.files.values():
            counts[f["topic"]] = counts.get(f["topic"], 0) + f["records"]
            self.undecodable += f["undecodable"]
            pv.update(f["policy_versions"])
            keys.update(f["key_ids"])
            vv.update(f["verifier_versions"])
            tasks.update(f["tasks"])
            if f["first_created_at"] is not None:
                firsts.append(f["first_created_at"])
                lasts.append(f["last_created_at"])
        self.messages_per_topic = dict(sorted(counts.items()))
        self.policy_versions, self.signing_key_ids = sorted(pv), sorted(keys)
        self.verifier_versions, self.tasks = sorted(vv), sorted(tasks)
        self.first_created_at = min(firsts, default=None)
        self.last_created_at = max(lasts, default=None)


def load_manifest(run_path: Path, run_id: str) -> Manifest:
    """The run's manifest, or an empty one."""
    path = run_path / "manifest.json"
    if path.exists():
        return msgspec.json.decode(path.read_bytes(), type=Manifest)
    return Manifest(run_id=run_id)


def save_manifest(run_path: Path, manifest: Manifest) -> None:
    """Write manifest.json atomically."""
    write_json_atomically(run_path / "manifest.json", msgspec.to_builtins(manifest))


class RunLog:
    """The decoded records of one archived run (first occurrence of each id, in broker append order)."""

    def __init__(self, root: Path, run_id: str) -> None:
        self.run_id = run_id
        self.path = root / run_dir_name(run_id)
        if not self.path.is_dir():
            raise FileNotFoundError(f"no run log for {run_id!r} under {root} (is `primerl archive` running?)")

    def _unique(self, topic: str) -> list[Any]:
        seen: set[str] = set()
        out = []
        for _, msg in read_messages(self.path, topic):
            if msg.id not in seen:
                seen.add(msg.id)
                out.append(msg)
        return out

    def prompts(self) -> list[PromptRequest]:
        """Recorded prompt requests."""
        return self._unique(PROMPTS.name)

    def completions(self) -> list[Completion]:
        """Recorded final completions."""
        return self._unique(COMPLETIONS.name)

    def rewards(self) -> list[Reward]:
        """Recorded rewards (every verifier version)."""
        return self._unique(REWARDS.name)

    def policy_updates(self) -> list[PolicyUpdate]:
        """Recorded policy updates."""
        return self._unique(POLICY.name)
