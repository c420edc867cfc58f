"""Where the router's cost model puts the bench's opening burst: 4 session first turns and
2 GRPO groups of 8 separate requests, all under one shared system prompt (perf/workload.py's
2,048-token cell), decided one at a time in the order the router takes them: the burst's
records are keyed (session id, group id) over rollout.prompts' 16 partitions, and a fetch
hands the router one partition's records after another, in publish order within each; which
partition comes first, and where each key lands, differs from run to run (`--order shuffle`:
any order at all).

It calls router/cost_model.choose on perf/fleet_sim's IndexView of each worker (the pending
blocks and load each decision adds, as the router records them in Redis; nothing is served
during a burst of a few milliseconds, so nothing is released or expires). What it
counts is how the four sessions split over two workers: a session stays where its first turn
went (its own prefix is cached there), so a 4/0 or 3/1 split leaves one engine with most of
the cell's later turns while the other idles after its groups.

    python -m perf.session_split_sim [--orders 2000] [--latency-weight 0.5] [--order partitions|shuffle]
                                     [--no-balance-sessions]

`--no-balance-sessions` is the router before routing.balance_sessions (levers run 3).
"""

from __future__ import annotations

import argparse
import math
import random
from collections import Counter

from perf.fleet_sim import IndexView
from plumbing.prefix_cache.index import Probe
from router.cost_model import choose
from schemas.registry import WorkerInfo

BLOCK = 32
SYSTEM_BLOCKS = 16  # 512 tokens: a quarter of the 2,048 context
SESSION = (1362, 26)  # first-turn prompt tokens, blocks of its own after the system prompt
GROUP = (1872, 42)
DECODE = 32.0


Request = tuple[str, list[str], int]  # routing key, block hashes, prompt tokens


def _chain(key: str, own_blocks: int) -> list[str]:
    """The block hashes of a prompt: the shared system prompt's, then `own_blocks` of its own."""
    return [f"sys:{b}" for b in range(SYSTEM_BLOCKS)] + [f"{key}:{b}" for b in range(own_blocks)]


def burst() -> list[Request]:
    """Each request of the opening burst, in publish order (sessions, then groups)."""
    out = [(f"s{i}", _chain(f"s{i}", SESSION[1]), SESSION[0]) for i in range(4)]
    for g in range(2):
        out += [(f"g{g}", _chain(f"g{g}", GROUP[1]), GROUP[0])] * 8
    return out


def partition_order(requests: list[Request], rng: random.Random, partitions: int = 16) -> list[Request]:
    """`requests` as the router sees them: partition by partition, publish order within one."""
    where = {key: rng.randrange(partitions) for key in sorted({k for k, _, _ in requests})}
    first = list(range(partitions))
    rng.shuffle(first)
    rank = {p: i for i, p in enumerate(first)}
    return sorted(requests, key=lambda r: rank[where[r[0]]])


def split(order: list[Request], latency_weight: float, balance_sessions: bool = True) -> tuple[int, ...]:
    """Sessions per worker (most first) after routing `order`; `balance_sessions` as the
    router's routing.balance_sessions (a first turn goes to the fewest live sessions)."""
    workers = [WorkerInfo(worker_id=f"w{i}") for i in range(2)]
    views = [IndexView() for _ in workers]
    home: dict[str, int] = {}
    for key, chain, n in order:
        live = Counter(home[k] for k in home if k.startswith("s"))
        probes = [
            Probe(w, v.matched(chain, 0.0), v.prefill_load, v.decode_load, live[i])
            for i, (w, v) in enumerate(zip(workers, views, strict=True))
        ]
        opens = balance_sessions and key.startswith("s") and key not in home
        c = choose(probes, n, BLOCK, DECODE, 1.0, latency_weight, tie_key=key.encode(), new_session=opens)
        i = workers.index(c.probe.worker)
        views[i].pending.update(dict.fromkeys(chain, math.inf))
        views[i].prefill_load += c.prefill_tokens
        views[i].decode_load += DECODE
        home.setdefault(key, i)
    per = Counter(home[f"s{i}"] for i in range(4))
    return tuple(sorted((per[i] for i in range(len(workers))), reverse=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--orders", type=int, default=2000)
    p.add_argument("--latency-weight", type=float, default=0.5)
    p.add_argument("--order", choices=("partitions", "shuffle"), default="partitions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-balance-sessions", dest="balance", action="store_false")
    a = p.parse_args()
    rng = random.Random(a.seed)
    counts: Counter[tuple[int, ...]] = Counter()
    for _ in range(a.orders):
        order = burst()
        if a.order == "shuffle":
            rng.shuffle(order)
        else:
            order = partition_order(order, rng)
        counts[split(order, a.latency_weight, a.balance)] += 1
    for s, n in sorted(counts.items()):
        print(f"sessions per worker {s}: {n / a.orders:.1%} of {a.orders} orders")
    print(f"in publish order (sessions first): {split(burst(), a.latency_weight, a.balance)}")


if __name__ == "__main__":
    main()
