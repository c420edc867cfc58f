"""Every process's /metrics as one Prometheus text file, each sample labelled with its process.

A minimal version (the bench's branch); a family served by several processes is
written once, with one HELP/TYPE and every process's samples under it.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector


def _page(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return str(resp.read().decode("utf-8"))


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


async def scrape(targets: dict[str, str]) -> str:
    """Fetch each target (process name -> metrics URL) and merge the pages, with a `process` label."""
    pages = await asyncio.gather(*(asyncio.to_thread(_page, url) for url in targets.values()))
    merged: dict[str, Metric] = {}
    for process, page in zip(targets, pages, strict=True):
        for fam in text_string_to_metric_families(page):
            into = merged.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type, fam.unit))
            if into.type != fam.type:
                raise ValueError(f"{fam.name} is a {fam.type} in {process} but a {into.type} elsewhere")
            into.samples += [s._replace(labels={**s.labels, "process": process}) for s in fam.samples]
    return generate_latest(_Families(list(merged.values()))).decode("utf-8")


def write_scrape(path: Path | str, text: str) -> Path:
    """Write `text` to `path` (its folder created); returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out
