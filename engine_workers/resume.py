"""Resuming a redelivered request's samples from rollout.completion-chunks (issue 22).

A worker that dies mid-request leaves every token it streamed in the chunk log; the
worker that takes the redelivered request reads them back and continues each sample
from its last acknowledged token instead of generating it again.

Progress counts only what the broker acknowledged: what a reader can fetch from the
log was acknowledged (acks=all), and nothing else is looked at. Where the scan starts:
the worker keeps `primerl:resume:<request id>` = "partition:offset" of the request's
first acked chunk in Redis (one SET NX per request). Without it a reader would scan the
partition from its beginning, which grows with the run (every streamed token of every
request is a record there); with it, only the records written since the request started.
No pointer (the first delivery, or Redis was down then) means no scan: the sample restarts,
and a first delivery costs one GET. Measured (perf/resume_bench.py, 2 loaded cores): a
scan of ~1,030 records from the pointer took 0.44-0.53 s, most of it the consumer's start
and the 300 ms empty fetch that ends it; it replaces regenerating ~258 tokens per sample
(the batch's ~2,060 tokens: ~50 s of decode at its 40 tok/s). A Redis copy of every token would cost a write
per token on the hot path, and be progress the broker never acknowledged.

A sample resumes only from a clean chain of one attempt: its chunks in log order are seq
0, 1, 2 ... with no gap, each with one log-prob per token, valid token ids, at most
`max_tokens` tokens in all; an identical duplicate (a producer retry) is skipped. Anything
else (a gap, out of order, two different chunks for one seq, garbage) and the sample
restarts from the prompt. Attempts never mix: a resumed attempt re-publishes the prefix it
continues as its own first chunks, so its chain alone is the whole sample.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Iterable
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition

from plumbing.config import Config, ResumePolicy
from plumbing.kafka import common_kwargs
from schemas import CompletionChunk, DecodeError, decode
from schemas.completions import VersionSpan
from schemas.topics import CHUNKS

log = logging.getLogger(__name__)

# A chunk is a few tokens; one over this is not ours (the producer's limit is 1 MiB).
MAX_CHUNK_BYTES = 1 << 20
# Re-published prefix chunks carry at most this many tokens (a record stays far under 1 MiB).
REPUBLISH_TOKENS = 256


class Prefix(msgspec.Struct, kw_only=True):
    """The acknowledged start of one sample, as one attempt streamed it."""

    sample_index: int
    attempt: str
    texts: list[str]  # per chunk, so re-published text splits the same way
    chunk_sizes: list[int]  # tokens per chunk
    chunk_versions: list[int]  # policy version per chunk
    token_ids: list[int]
    logprobs: list[float]
    spans: list[VersionSpan]  # policy version per token span, from chunk 0
    finish_reason: str = ""  # set when the attempt streamed the sample's end

    @property
    def text(self) -> str:
        return "".join(self.texts)

    @property
    def versions(self) -> set[int]:
        return {s.version for s in self.spans}


class ScanStats(msgspec.Struct, kw_only=True):
    """What reading one request's chunk log cost and found."""

    scanned: int = 0  # records fetched from the partition
    matched: int = 0  # records keyed by the request
    garbage: int = 0  # of those: undecodable, oversized, or another run's
    seconds: float = 0.0
    complete: bool = False  # reached the end of the log before a bound


def parse_hint(raw: bytes | str | None) -> tuple[int, int] | None:
    """(partition, offset) of a stored pointer, None for a missing or malformed one."""
    if raw is None:
        return None
    try:
        text = raw.decode() if isinstance(raw, bytes) else raw
        part, _, off = text.partition(":")
        partition, offset = int(part), int(off)
    except (UnicodeDecodeError, ValueError):
        return None
    if not 0 <= partition < CHUNKS.partitions or offset < 0:
        return None
    return partition, offset


def format_hint(partition: int, offset: int) -> str:
    return f"{partition}:{offset}"


def _chunk_ok(c: CompletionChunk, vocab_size: int) -> bool:
    if len(c.logprobs) != len(c.token_ids):
        return False
    if any(not (0 <= t < vocab_size) for t in c.token_ids):
        return False
    # vLLM's sampled log-probs are <= 0; a little slack for float rounding.
    return all(math.isfinite(lp) and lp <= 1e-3 for lp in c.logprobs)


def _content(c: CompletionChunk) -> tuple[object, ...]:
    return (c.text, c.token_ids, c.logprobs, c.policy_version, c.finish_reason)


def _chain(chunks: list[CompletionChunk], vocab_size: int) -> list[CompletionChunk] | None:
    """The chunks of one attempt's sample in seq order, or None when they are not a clean chain."""
    out: list[CompletionChunk] = []
    for c in chunks:
        if c.seq < len(out):
            if c.seq < 0 or _content(c) != _content(out[c.seq]):
                return None  # two different chunks for one seq
            continue  # identical duplicate (a producer retry)
        if c.seq != len(out) or not _chunk_ok(c, vocab_size):
            return None  # a gap, out of order, or garbage
        if out and out[-1].finish_reason:
            return None  # tokens after the sample's end
        out.append(c)
    return out


def prefixes(
    chunks: Iterable[CompletionChunk],
    *,
    run_id: str,
    request_id: str,
    group_size: int,
    vocab_size: int,
    max_tokens: int,
) -> dict[int, Prefix]:
    """The longest clean acknowledged prefix of each sample of a request (in log order `chunks`)."""
    by_attempt: dict[tuple[int, str], list[CompletionChunk]] = {}
    for c in chunks:
        if c.run_id != run_id or c.request_id != request_id or not 0 <= c.sample_index < group_size:
            continue
        by_attempt.setdefault((c.sample_index, c.attempt), []).append(c)
    best: dict[int, Prefix] = {}
    for (index, attempt), group in by_attempt.items():
        chain = _chain(group, vocab_size)
        if not chain:
            continue
        token_ids = [t for c in chain for t in c.token_ids]
        if not token_ids or len(token_ids) > max_tokens:
            continue
        spans: list[VersionSpan] = []
        at = 0
        for c in chain:
            if c.token_ids and (not spans or spans[-1].version != c.policy_version):
                spans.append(VersionSpan(at, c.policy_version))
            at += len(c.token_ids)
        p = Prefix(
            sample_index=index,
            attempt=attempt,
            texts=[c.text for c in chain],
            chunk_sizes=[len(c.token_ids) for c in chain],
            chunk_versions=[c.policy_version for c in chain],
            token_ids=token_ids,
            logprobs=[lp for c in chain for lp in c.logprobs],
            spans=spans,
            finish_reason=chain[-1].finish_reason,
        )
        old = best.get(index)
        # Later attempts come later in the log: on a tie the newer one wins.
        if old is None or (len(p.token_ids), bool(p.finish_reason)) >= (len(old.token_ids), bool(old.finish_reason)):
            best[index] = p
    return best


def usable(p: Prefix, serving_version: int, policy: ResumePolicy) -> bool:
    """Whether a prefix may be continued by an engine serving `serving_version` (engine.resume_policy)."""
    if any(v > serving_version for v in p.versions):
        return False  # sampled by a newer policy than this engine has: never mix backwards
    return policy == "continue" or p.versions == {serving_version}


async def read_chunks(
    cfg: Config,
    topic: str,
    request_id: str,
    partition: int,
    offset: int,
    *,
    timeout_s: float,
    max_records: int,
    idle_ms: int = 300,
    max_record_bytes: int = MAX_CHUNK_BYTES,
) -> tuple[list[CompletionChunk], ScanStats]:
    """The chunks keyed `request_id` on `topic`'s `partition` from `offset` on, in log order.

    Ends at the end of the log (an empty fetch: the local broker's end offsets are wrong
    for multi-record batches, so they are not used), after `timeout_s`, or after
    `max_records`. What it has read by then is a prefix of the log, so still clean chains.
    """
    stats = ScanStats()
    key = request_id.encode()
    found: list[CompletionChunk] = []
    t0 = time.perf_counter()
    consumer = AIOKafkaConsumer(**common_kwargs(cfg), group_id=None, enable_auto_commit=False)
    tp = TopicPartition(topic, partition)
    try:
        async with asyncio.timeout(timeout_s):
            await consumer.start()
            consumer.assign([tp])
            consumer.seek(tp, offset)
            while stats.scanned < max_records:
                batch = await consumer.getmany(tp, timeout_ms=idle_ms, max_records=10_000)
                records = batch.get(tp, [])
                if not records:
                    stats.complete = True
                    break
                for r in records[: max_records - stats.scanned]:
                    stats.scanned += 1
                    if r.key != key:
                        continue  # another request's chunk: not even decoded
                    stats.matched += 1
                    value = r.value or b""
                    if len(value) > max_record_bytes:
                        stats.garbage += 1
                        continue
                    try:
                        found.append(decode(value, CompletionChunk, list(r.headers or ())))
                    except (DecodeError, ValueError, TypeError):
                        stats.garbage += 1
    except TimeoutError:
        log.warning("chunk log of %s: scan cut at %.1fs after %d records", request_id, timeout_s, stats.scanned)
    finally:
        await consumer.stop()
        stats.seconds = time.perf_counter() - t0
    return found, stats


def republished(p: Prefix, run_id: str, request_id: str, attempt: str) -> list[CompletionChunk]:
    """The prefix as the new attempt's first chunks (seq from 0): runs of the original chunks
    of one policy version, at most REPUBLISH_TOKENS tokens each (a 512-token prefix streamed
    one token a chunk goes back as 2 records, not 512)."""
    out: list[CompletionChunk] = []
    start = 0
    texts: list[str] = []
    at = 0
    for i, (text, size, version) in enumerate(zip(p.texts, p.chunk_sizes, p.chunk_versions, strict=True)):
        texts.append(text)
        at += size
        last = i == len(p.texts) - 1
        if last or at - start >= REPUBLISH_TOKENS or p.chunk_versions[i + 1] != version:
            out.append(
                CompletionChunk(
                    run_id=run_id,
                    request_id=request_id,
                    sample_index=p.sample_index,
                    seq=len(out),
                    text="".join(texts),
                    token_ids=p.token_ids[start:at],
                    logprobs=p.logprobs[start:at],
                    policy_version=version,
                    finish_reason=p.finish_reason if last else "",
                    attempt=attempt,
                )
            )
            start, texts = at, []
    return out


def held_back_text(tokenizer: Any, prefix: Prefix) -> str:
    """The text of a prefix's tokens that its chunks never carried.

    vLLM streams tokens at once but holds text back while it could still be the start
    of a stop string (and while a character's bytes are incomplete); a worker that died
    then left tokens whose text no chunk has. The continuation's own text starts after
    them, so without this the final text would lack those characters (and fail the
    verifier's text/token check).
    """
    full = str(tokenizer.decode(prefix.token_ids, skip_special_tokens=True))
    return full[len(prefix.text) :] if full.startswith(prefix.text) else ""


class Continuation:
    """The text of a resumed sample's continuation, with its stop strings checked across the boundary.

    vLLM checks stop strings in the text it generates, and a continuation's text starts
    at the resume point: a stop string begun in the prefix ("</to") and finished in the
    continuation ("ol>") would go unseen. This keeps the prefix's held-back text and the
    continuation's in one pending buffer, emits only what can no longer be the start of
    a stop string, and cuts at the first stop string found anywhere in it.
    """

    def __init__(self, held_back: str, stops: list[str]) -> None:
        self.pending = held_back
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1

    def feed(self, text: str, finished: bool) -> tuple[str, bool]:
        """(the text to emit now, whether a stop string ended the sample here)."""
        self.pending += text
        hits = [at for at in (self.pending.find(s) for s in self.stops) if at >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        keep = 0 if finished else min(self.hold, len(self.pending))
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False
