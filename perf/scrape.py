"""One Prometheus text exposition from every process of a run: `artifacts/metrics.txt`.

Each process serves its own registry on `/metrics`; `scrape` fetches them all and
merges them as Prometheus itself would store them: every sample gets a
`process="<name>"` label, and a metric family served by several processes (the
consumer metrics of plumbing/, `primerl_consumer_lag` of the archiver) appears once,
one HELP/TYPE pair with every process's samples under it. Parsing and writing use
prometheus_client's own text parser and exposition code, so escaping, `_total`,
`_created` and histogram suffixes follow the format's rules, and the result passes
`promtool check metrics`.
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
from prometheus_client.samples import Sample

PROCESS_LABEL = "process"


class ScrapeError(RuntimeError):
    """A target did not answer, or two processes disagree on a family's type."""


def _fetch(url: str, timeout_s: float) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        body: bytes = resp.read()
    return body.decode("utf-8")


async def fetch_pages(targets: dict[str, str], timeout_s: float = 10.0) -> dict[str, str]:
    """The `/metrics` page of every target, fetched at once (in threads: urllib blocks)."""
    names = list(targets)
    results = await asyncio.gather(
        *(asyncio.to_thread(_fetch, targets[n], timeout_s) for n in names), return_exceptions=True
    )
    pages: dict[str, str] = {}
    for name, got in zip(names, results, strict=True):
        if isinstance(got, BaseException):
            raise ScrapeError(f"{name} ({targets[name]}): {got}") from got
        pages[name] = got
    return pages


class _Merged(Collector):
    """The merged families, in order of first appearance, for prometheus_client's exposition."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families


def _labelled(sample: Sample, process: str) -> Sample:
    labels = dict(sample.labels)
    if PROCESS_LABEL in labels:  # keep the process's own label, as Prometheus does (honor_labels: false)
        labels[f"exported_{PROCESS_LABEL}"] = labels.pop(PROCESS_LABEL)
    labels[PROCESS_LABEL] = process
    return sample._replace(labels=labels)


def merge(pages: dict[str, str]) -> str:
    """Merge processes' expositions (name -> text) into one, with a `process` label on every sample."""
    families: dict[str, Metric] = {}
    for process, text in pages.items():
        for fam in text_string_to_metric_families(text):
            merged = families.get(fam.name)
            if merged is None:
                merged = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            elif merged.type != fam.type:
                raise ScrapeError(f"{fam.name}: type {fam.type} in {process}, {merged.type} elsewhere")
            merged.samples.extend(_labelled(s, process) for s in fam.samples)
    return generate_latest(_Merged(list(families.values()))).decode("utf-8")


async def scrape(targets: dict[str, str], timeout_s: float = 10.0) -> str:
    """Fetch every target's `/metrics` (process name -> URL) and merge them; see the module doc."""
    return merge(await fetch_pages(targets, timeout_s))


def write_scrape(path: Path | str, text: str) -> Path:
    """Write the scrape (creating its folder); returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out
