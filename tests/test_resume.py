"""Reading a dead attempt's chunks back (engine_workers/resume.py): which prefixes are clean
enough to resume from. Unit tests on the chain rules, and the log reader against the real
broker fed garbage (undecodable, oversized, other requests' and other runs' chunks)."""

from __future__ import annotations

import uuid

import msgspec
import pytest

from engine_workers.resume import (
    REPUBLISH_TOKENS,
    Continuation,
    format_hint,
    held_back_text,
    parse_hint,
    prefixes,
    read_chunks,
    republished,
    usable,
)
from plumbing.config import Config
from plumbing.kafka import Publisher
from schemas import CompletionChunk, encode
from schemas.completions import VersionSpan
from schemas.topics import CHUNKS

RUN, REQ = "run-a", "req-a"


def _c(seq: int, tokens: list[int], *, index: int = 0, attempt: str = "a1", version: int = 0, **kw) -> CompletionChunk:
    fields = {
        "run_id": RUN,
        "request_id": REQ,
        "sample_index": index,
        "seq": seq,
        "text": "".join(f"<{t}>" for t in tokens),
        "token_ids": tokens,
        "logprobs": [-0.5] * len(tokens),
        "policy_version": version,
        "attempt": attempt,
        **kw,
    }
    return CompletionChunk(**fields)


def _p(chunks: list[CompletionChunk], group_size: int = 2, max_tokens: int = 100):
    return prefixes(chunks, run_id=RUN, request_id=REQ, group_size=group_size, vocab_size=1000, max_tokens=max_tokens)


def test_a_clean_chain_gives_its_tokens_logprobs_and_text() -> None:
    got = _p([_c(0, [1, 2]), _c(1, [3]), _c(0, [7], index=1), _c(2, [4])])
    assert got[0].token_ids == [1, 2, 3, 4] and got[0].logprobs == [-0.5] * 4
    assert got[0].text == "<1><2><3><4>" and got[0].finish_reason == ""
    assert got[1].token_ids == [7]
    assert got[0].spans == [VersionSpan(0, 0)]


def test_gaps_and_out_of_order_chunks_restart_the_sample() -> None:
    assert 0 not in _p([_c(0, [1]), _c(2, [3])])  # seq 1 missing
    assert 0 not in _p([_c(1, [2]), _c(0, [1])])  # out of order in the log
    assert 0 not in _p([_c(1, [2]), _c(2, [3])])  # no seq 0
    assert 0 not in _p([_c(-1, [2])])


def test_identical_duplicates_are_skipped_and_conflicting_ones_restart() -> None:
    assert _p([_c(0, [1]), _c(0, [1]), _c(1, [2]), _c(1, [2])])[0].token_ids == [1, 2]
    assert 0 not in _p([_c(0, [1]), _c(1, [2]), _c(1, [9])])


def test_attempts_never_mix_and_the_longest_chain_wins() -> None:
    # Two attempts both wrote seq 0.. (a redelivery that restarted): never spliced.
    got = _p([_c(0, [1], attempt="a1"), _c(0, [5], attempt="a2"), _c(1, [6], attempt="a2"), _c(1, [2], attempt="a1")])
    assert got[0].token_ids in ([1, 2], [5, 6])
    got = _p([_c(0, [1], attempt="a1"), _c(0, [5], attempt="a2"), _c(1, [6], attempt="a2"), _c(2, [7], attempt="a2")])
    assert got[0].token_ids == [5, 6, 7] and got[0].attempt == "a2"


def test_other_runs_requests_and_samples_out_of_range_are_ignored() -> None:
    theirs = [
        msgspec.structs.replace(_c(0, [1]), run_id="other"),
        msgspec.structs.replace(_c(0, [1]), request_id="other"),
        _c(0, [1], index=5),
        _c(0, [1], index=-1),
    ]
    assert _p(theirs) == {}


@pytest.mark.parametrize(
    "bad",
    [
        {"logprobs": [-0.1]},  # one log-prob for two tokens
        {"logprobs": []},  # written before chunks carried log-probs
        {"logprobs": [float("nan"), -0.1]},
        {"logprobs": [float("-inf"), -0.1]},
        {"logprobs": [3.0, -0.1]},  # not a log-probability
        {"token_ids": [1, 10**6], "logprobs": [-0.1, -0.1]},  # outside the vocabulary
        {"token_ids": [-3, 1], "logprobs": [-0.1, -0.1]},
    ],
)
def test_garbage_chunk_contents_restart_the_sample(bad: dict) -> None:
    chunk = msgspec.structs.replace(_c(1, [1, 2]), **bad)
    assert 0 not in _p([_c(0, [5]), chunk])


def test_finished_and_overlong_chains() -> None:
    got = _p([_c(0, [1]), _c(1, [2], finish_reason="stop")])
    assert got[0].finish_reason == "stop"
    assert 0 not in _p([_c(0, [1], finish_reason="stop"), _c(1, [2])])  # tokens after the end
    assert 0 not in _p([_c(0, list(range(5)))], max_tokens=4)
    assert 0 not in _p([_c(0, [], text="")])  # nothing to continue from


def test_the_policy_rule_decides_on_older_versions() -> None:
    mixed = _p([_c(0, [1], version=2), _c(1, [2], version=3)])[0]
    assert mixed.spans == [VersionSpan(0, 2), VersionSpan(1, 3)]
    assert usable(mixed, 3, "continue") and not usable(mixed, 3, "restart")
    same = _p([_c(0, [1], version=3)])[0]
    assert usable(same, 3, "restart") and usable(same, 3, "continue")
    assert not usable(same, 2, "continue")  # sampled by a newer policy than served: never


def test_the_prefix_is_republished_as_few_chunks_of_one_version_each() -> None:
    n = REPUBLISH_TOKENS + 10
    chain = [_c(i, [i % 1000], version=0 if i < 5 else 1) for i in range(n)]
    p = _p(chain, max_tokens=10_000)[0]
    out = republished(p, RUN, REQ, "a9")
    assert [c.seq for c in out] == list(range(len(out))) and len(out) == 3
    assert [c.policy_version for c in out] == [0, 1, 1]
    assert [t for c in out for t in c.token_ids] == p.token_ids
    assert "".join(c.text for c in out) == p.text and all(c.attempt == "a9" for c in out)
    again = _p(out, max_tokens=10_000)[0]  # a second death reads the new attempt's chain alone
    assert again.token_ids == p.token_ids and again.logprobs == p.logprobs and again.spans == p.spans


@pytest.mark.parametrize("raw", [None, b"", b"x", b"3", b"3:", b"-1:5", b"99:5", b"2:-1", b"\xff\xfe", "a:b"])
def test_malformed_pointers_mean_no_scan(raw) -> None:
    assert parse_hint(raw) is None


def test_pointers_round_trip() -> None:
    assert parse_hint(format_hint(3, 17).encode()) == (3, 17)


async def test_the_log_reader_skips_garbage_and_other_requests(cfg: Config) -> None:
    req = f"rq-{uuid.uuid4().hex[:8]}"
    key = req.encode()
    mine = [msgspec.structs.replace(_c(i, [i + 1]), request_id=req) for i in range(3)]
    async with Publisher(cfg) as pub:
        first = await pub.publish(CHUNKS.name, mine[0], key=key)
        await pub.publish_raw(CHUNKS.name, b"\x93garbage", key=key, partition=first.partition)
        # Oversized for the reader (its limit is lowered here: the producer refuses a record
        # over 1 MiB, the reader's real limit, so one that big comes only from another client).
        big = encode(msgspec.structs.replace(mine[1], text="x" * 200_000))
        await pub.publish_raw(CHUNKS.name, big, key=key, partition=first.partition)
        await pub.publish(CHUNKS.name, mine[1], key=key)
        await pub.publish(CHUNKS.name, msgspec.structs.replace(mine[2], run_id="someone-else"), key=key)
        await pub.publish(CHUNKS.name, _c(0, [9]), key=b"another-request", partition=first.partition)
        await pub.publish(CHUNKS.name, mine[2], key=key)
    chunks, stats = await read_chunks(
        cfg,
        CHUNKS.name,
        req,
        first.partition,
        first.offset,
        timeout_s=20,
        max_records=100_000,
        max_record_bytes=100_000,
    )
    assert stats.complete and stats.garbage == 2 and stats.matched == 6
    got = prefixes(chunks, run_id=RUN, request_id=req, group_size=1, vocab_size=1000, max_tokens=10)
    assert got[0].token_ids == [1, 2, 3]
    # Bounded: a scan cut short still returns a prefix of the log.
    cut, cut_stats = await read_chunks(
        cfg, CHUNKS.name, req, first.partition, first.offset, timeout_s=20, max_records=1
    )
    assert cut_stats.scanned == 1 and not cut_stats.complete and [c.seq for c in cut] == [0]


def test_a_stop_string_across_the_resume_point_ends_the_sample_there() -> None:
    # The dead attempt's chunks ended in "</to" (vLLM held it back as a possible stop
    # string); the continuation writes "ol> and more".
    c = Continuation("</to", ["</tool>"])
    assert c.feed("ol", finished=False) == ("", False)  # "</tool" could still be the stop string
    assert c.feed("> and more", finished=False) == ("", True)  # cut at the stop string, as vLLM would
    # The last len(stop) - 1 characters are held (as vLLM holds them), the rest emitted.
    c = Continuation("", ["</tool>"])
    assert c.feed("2 + 2 </t", finished=False) == ("2 +", False)
    assert c.feed("able>", finished=True) == (" 2 </table>", False)  # finished: nothing more is held
    # No stop strings: the held-back text comes out at once.
    assert Continuation("é", []).feed("t", finished=False) == ("ét", False)


def test_held_back_text_is_what_the_prefix_tokens_decode_to_beyond_their_chunks() -> None:
    from transformers import AutoTokenizer

    from plumbing.model_store import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(None))
    ids = tok.encode("call <tool name=x>1</to", add_special_tokens=False)

    def prefix(text: str):
        kw = {"run_id": RUN, "request_id": REQ, "group_size": 1, "vocab_size": len(tok), "max_tokens": 100}
        return prefixes([_c(0, ids, text=text)], **kw)[0]

    assert held_back_text(tok, prefix("call <tool name=x>1")) == "</to"
    # Chunks that are not a prefix of the decoding (another tokenizer's text): nothing is guessed.
    odd = prefix("something else")
    assert held_back_text(tok, odd) == ""
