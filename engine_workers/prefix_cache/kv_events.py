"""Subscriber to one engine's KV-cache events (vLLM's ZMQ publisher)."""

from __future__ import annotations

import logging

import msgspec
import zmq
import zmq.asyncio

from plumbing.prefix_cache.held_blocks import HeldBlocks

log = logging.getLogger(__name__)


async def follow_kv_events(endpoint: str, topic: str, blocks: HeldBlocks) -> None:
    """Apply every event batch published on `endpoint` to `blocks`, until cancelled.

    A gap in vLLM's sequence numbers means events were dropped (the publisher's high
    water mark): the index may then miss blocks until they are evicted or re-stored.
    """
    from vllm.distributed.kv_events import KVEventBatch

    decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
    ctx = zmq.asyncio.Context.instance()
    sock = ctx.socket(zmq.SUB)
    sock.connect(endpoint)
    sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
    last_seq = -1
    try:
        while True:
            _, seq_bytes, payload = await sock.recv_multipart()
            seq = int.from_bytes(seq_bytes, "big")
            if last_seq >= 0 and seq != last_seq + 1:
                log.warning("kv events %d..%d lost: the index may miss blocks", last_seq + 1, seq - 1)
            last_seq = seq
            for event in decoder.decode(payload).events:
                blocks.apply(event)
    finally:
        sock.close(linger=0)
