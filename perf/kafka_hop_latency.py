"""One Kafka hop on the local broker: publish-to-consume latency of a record to an idle
consumer, and the broker's CPU while idle consumers poll, at several `fetch_max_wait_ms`
(plumbing/config.py's kafka.fetch_max_wait_ms cites these figures).

    python -m perf.kafka_hop_latency [--waits 500,250,100,50,20] [--records 25] [--consumers 10]

Writes artifacts/kafka_hop_latency.csv and .png; ~1 min per wait.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from pathlib import Path

import msgspec
import psutil
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from tqdm import tqdm

from perf.common import ARTIFACTS, write_csv
from perf.workload import ROOT
from plumbing.local_servers import start_broker, stop_process


class HopCost(msgspec.Struct):
    """One fetch_max_wait_ms: hop latency to an idle consumer, and the broker's idle CPU."""

    fetch_max_wait_ms: int
    hop_median_ms: float
    hop_max_ms: float
    idle_broker_core_share: float
    idle_consumers: int


async def _topic(boot: str, partitions: int) -> str:
    name = f"hop-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=boot)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()
    return name


async def hop_latency(boot: str, wait_ms: int, records: int) -> list[float]:
    """Seconds from publish to consume of `records` records, each sent to an idle consumer."""
    topic = await _topic(boot, 4)
    producer = AIOKafkaProducer(bootstrap_servers=boot, linger_ms=5, acks="all")
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=boot,
        group_id=f"hop-{wait_ms}",
        auto_offset_reset="earliest",
        fetch_max_wait_ms=wait_ms,
    )
    await producer.start()
    await consumer.start()
    try:
        await producer.send_and_wait(topic, b"warm-up")
        await consumer.getone()
        out = []
        for i in range(records):
            await asyncio.sleep(0.37)  # idle: the consumer is waiting in a fetch
            t0 = time.perf_counter()
            await producer.send_and_wait(topic, b"x", key=str(i).encode())
            await consumer.getone()
            out.append(time.perf_counter() - t0)
        return out
    finally:
        await consumer.stop()
        await producer.stop()


async def idle_cost(boot: str, broker: psutil.Process, wait_ms: int, consumers: int) -> float:
    """The broker's share of one core while `consumers` idle consumers poll a 16-partition topic."""
    topic = await _topic(boot, 16)
    cs = [
        AIOKafkaConsumer(topic, bootstrap_servers=boot, group_id=f"idle-{i}", fetch_max_wait_ms=wait_ms)
        for i in range(consumers)
    ]
    for c in cs:
        await c.start()
    polls = [asyncio.create_task(c.getmany(timeout_ms=60_000)) for c in cs]
    try:
        await asyncio.sleep(3)
        t0, w0 = sum(broker.cpu_times()[:2]), time.monotonic()
        await asyncio.sleep(10)
        return (sum(broker.cpu_times()[:2]) - t0) / (time.monotonic() - w0)
    finally:
        for p in polls:
            p.cancel()
        await asyncio.gather(*polls, return_exceptions=True)
        for c in cs:
            await c.stop()


async def run(waits: list[int], records: int, consumers: int, work_dir: Path) -> list[HopCost]:
    _, rec = start_broker(work_dir)
    boot = f"127.0.0.1:{rec.port}"
    rows = []
    try:
        for w in tqdm(waits, desc="fetch_max_wait_ms"):
            lat = sorted(await hop_latency(boot, w, records))
            share = await idle_cost(boot, psutil.Process(rec.pid), w, consumers)
            rows.append(HopCost(w, 1000 * statistics.median(lat), 1000 * lat[-1], share, consumers))
            tqdm.write(str(rows[-1]))
    finally:
        stop_process(rec)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--waits", default="500,250,100,50,20")
    p.add_argument("--records", type=int, default=25)
    p.add_argument("--consumers", type=int, default=10)
    p.add_argument("--out-dir", default=str(ARTIFACTS))
    a = p.parse_args()
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = asyncio.run(run([int(w) for w in a.waits.split(",")], a.records, a.consumers, ROOT / ".primerl" / "hop"))
    write_csv(out / "kafka_hop_latency.csv", rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r.fetch_max_wait_ms for r in rows]
    ax.plot(xs, [r.hop_median_ms for r in rows], "o-", label="hop latency, median (ms)")
    ax.set_xscale("log")
    ax.set_xlabel("fetch_max_wait_ms")
    ax.set_ylabel("ms")
    ax2 = ax.twinx()
    ax2.plot(
        xs, [100 * r.idle_broker_core_share for r in rows], "s--", color="tab:red", label="idle broker CPU (% core)"
    )
    ax2.set_ylabel("% of a core")
    fig.legend(loc="upper center")
    fig.tight_layout()
    fig.savefig(out / "kafka_hop_latency.png", dpi=120)
    print(f"wrote {out / 'kafka_hop_latency.csv'}, {out / 'kafka_hop_latency.png'}")


if __name__ == "__main__":
    main()
