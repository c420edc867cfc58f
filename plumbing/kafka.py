"""Kafka clients with the project's settings: an acking publisher and topic creation."""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.structs import RecordMetadata

from plumbing.config import Config
from plumbing.security import kafka_security_kwargs
from schemas import CONTENT_TYPE_HEADER, MSGPACK, Message, encode
from schemas.topics import TOPICS

log = logging.getLogger(__name__)


def common_kwargs(cfg: Config) -> dict[str, object]:
    """Settings shared by every Kafka client of this process (producer, consumer, admin): the
    broker, timeouts, and the SASL / TLS settings of plumbing/security.py."""
    if not cfg.bootstrap:
        raise RuntimeError("no Kafka broker configured: set KAFKA_BOOTSTRAP_SERVERS or run `primerl infra up`")
    return {
        "bootstrap_servers": cfg.bootstrap,
        "request_timeout_ms": cfg.kafka.request_timeout_ms,
        **kafka_security_kwargs(cfg.kafka),
    }


def consumer_kwargs(cfg: Config, group_id: str) -> dict[str, object]:
    """Consumer-group settings: manual commits, start from the earliest uncommitted record.

    `earliest`, never `latest`: the local broker reports wrong end offsets for
    multi-record batches, and a new group must not skip work anyway.
    """
    return {
        **common_kwargs(cfg),
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": cfg.kafka.session_timeout_ms,
        "heartbeat_interval_ms": cfg.kafka.heartbeat_interval_ms,
        "max_poll_interval_ms": cfg.kafka.max_poll_interval_ms,
        "fetch_max_wait_ms": cfg.kafka.fetch_max_wait_ms,
    }


class Publisher:
    """A producer whose `publish` returns only when the broker has acknowledged (acks=all).

    No idempotent producer: the local broker lacks InitProducerId, and consumers are
    idempotent by message id instead.
    """

    def __init__(self, cfg: Config) -> None:
        self._producer = AIOKafkaProducer(
            **common_kwargs(cfg),
            acks="all",
            enable_idempotence=False,
            linger_ms=cfg.kafka.linger_ms,
            compression_type=cfg.kafka.compression,
            max_request_size=cfg.kafka.max_request_size,
        )

    async def start(self) -> None:
        """Connect to the broker."""
        await self._producer.start()

    async def stop(self) -> None:
        """Flush and close."""
        await self._producer.stop()

    async def __aenter__(self) -> Publisher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def publish(
        self, topic: str, msg: Message, key: bytes | None = None, partition: int | None = None
    ) -> RecordMetadata:
        """Encode `msg` as msgpack and wait for the broker's ack (`partition` overrides the key's)."""
        return await self.publish_raw(topic, encode(msg), key, [(CONTENT_TYPE_HEADER, MSGPACK.encode())], partition)

    async def send(self, topic: str, msg: Message, key: bytes | None = None) -> asyncio.Future[RecordMetadata]:
        """Queue `msg` without waiting; await the returned future for the ack (for streams)."""
        return await self._producer.send(topic, encode(msg), key=key, headers=[(CONTENT_TYPE_HEADER, MSGPACK.encode())])

    async def publish_raw(
        self,
        topic: str,
        payload: bytes,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        partition: int | None = None,
    ) -> RecordMetadata:
        """Send bytes as they are (for replays and outside formats) and wait for the ack."""
        return await self._producer.send_and_wait(topic, payload, key=key, headers=headers or [], partition=partition)

    async def publish_many(self, topic: str, items: list[tuple[Message, bytes | None]]) -> list[RecordMetadata]:
        """Send a batch concurrently and wait for every ack (order per key is kept by the producer)."""
        futs = [await self.send(topic, m, k) for m, k in items]
        return list(await asyncio.gather(*futs))


async def create_topics(cfg: Config) -> list[str]:
    """Create every registry topic with its final partition count; returns the ones created."""
    kc = cfg.kafka
    conf = {} if kc.topic_min_insync_replicas is None else {"min.insync.replicas": str(kc.topic_min_insync_replicas)}
    admin = AIOKafkaAdminClient(**common_kwargs(cfg))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in TOPICS.values() if t.name not in existing]
        created = []
        for t in missing:
            try:
                await admin.create_topics(
                    [NewTopic(t.name, t.partitions, kc.topic_replication_factor, topic_configs=conf)]
                )
                created.append(t.name)
            except TopicAlreadyExistsError:
                pass
        if created:
            log.info("created topics %s", created)
        return created
    finally:
        await admin.close()
