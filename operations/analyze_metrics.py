"""The metrics guardrail: SLOs from a TOML file checked against a scrape or a Prometheus.

    python scripts/analyze_metrics.py --slo deploy/slo/ci.toml artifacts/metrics.txt
    primerl analyze-metrics --slo deploy/slo/bench.toml --prometheus http://127.0.0.1:9090

The source is a Prometheus text exposition (perf/scrape.py writes one per run, with a
`process` label) or a Prometheus server's HTTP API (`/api/v1/query`). Both are read
the same way: the raw series of a metric and label matchers are fetched and the
aggregation happens here, so a file and a server holding the same samples give the
same figures. Counters are cumulative (since each process started), so a ratio or a
quantile covers the whole run, not a recent window.

SLO kinds (one `[[slo]]` table each; `min`/`max` are inclusive bounds, at least one):
- `value`: `agg` (sum, max or min; default sum) over the series of `metric` matching
  `labels` (exact values), e.g. decode tokens >= 1, max consumer lag <= 64;
- `ratio`: sum(numerator) / sum(denominator), each a `{metric, labels}`, e.g. cached
  prompt tokens / prompt tokens, dead-lettered / consumed records;
- `quantile`: the `q` quantile of the histogram `metric` (its `_bucket` series summed
  by `le`), interpolated linearly within a bucket as PromQL's histogram_quantile does.
No data for an SLO (no series, a zero denominator, a histogram without observations)
is a breach with the reason, unless the SLO says `optional = true`.

Exit status: 0 when every SLO holds, 1 on a breach, 2 on a bad SLO file or a source
that cannot be read.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Protocol

from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# Names end up in PromQL selectors: only what the exposition format allows.
METRIC_NAME = r"^[a-zA-Z_:][a-zA-Z0-9_:]*$"
LABEL_NAME = r"^[a-zA-Z_][a-zA-Z0-9_]*$"

Labels = dict[Annotated[str, Field(pattern=LABEL_NAME)], str]


class _Strict(BaseModel):
    """A typo in an SLO file is an error, not an SLO silently checking nothing."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class Selector(_Strict):
    """Series of one metric (its exposition name, e.g. `..._total`) with these exact label values."""

    metric: str = Field(pattern=METRIC_NAME)
    labels: Labels = {}

    def describe(self) -> str:
        inner = ",".join(f'{k}="{v}"' for k, v in sorted(self.labels.items()))
        return f"{self.metric}{{{inner}}}" if inner else self.metric


class _Slo(_Strict):
    name: str
    """What the table calls it."""
    min: float | None = None
    """The value must be >= this."""
    max: float | None = None
    """The value must be <= this."""
    optional: bool = False
    """No data is not a breach (a metric that exists only once something happened)."""
    description: str = ""
    """Why the bound is what it is."""

    @model_validator(mode="after")
    def _bounded(self) -> _Slo:
        if self.min is None and self.max is None:
            raise ValueError(f"SLO {self.name!r}: give min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"SLO {self.name!r}: min {self.min} > max {self.max}")
        return self

    def threshold(self) -> str:
        if self.min is not None and self.min == self.max:
            return f"== {self.min:g}"
        parts = [f">= {self.min:g}" if self.min is not None else "", f"<= {self.max:g}" if self.max is not None else ""]
        return ", ".join(p for p in parts if p)

    def holds(self, value: float) -> bool:
        if math.isnan(value):
            return False
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)


class ValueSlo(_Slo, Selector):
    kind: Literal["value"]
    agg: Literal["sum", "max", "min"] = "sum"
    """How the matching series become one value."""


class RatioSlo(_Slo):
    kind: Literal["ratio"]
    numerator: Selector
    denominator: Selector


class QuantileSlo(_Slo, Selector):
    kind: Literal["quantile"]
    q: float = Field(ge=0.0, le=1.0)
    """The quantile, 0..1 (0.95 for p95)."""


Slo = Annotated[ValueSlo | RatioSlo | QuantileSlo, Field(discriminator="kind")]


class SloFile(_Strict):
    slo: list[Slo] = Field(min_length=1)


class SloFileError(ValueError):
    """The SLO file is missing, not TOML, or not a valid SLO list."""


class SourceError(RuntimeError):
    """The scrape file or the Prometheus server cannot be read."""


def load_slos(path: Path) -> list[ValueSlo | RatioSlo | QuantileSlo]:
    """The SLOs of a TOML file (see the module doc); SloFileError says what is wrong."""
    try:
        text = path.read_text()
    except OSError as err:
        raise SloFileError(f"{path}: {err}") from err
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise SloFileError(f"{path}: not valid TOML: {err}") from err
    try:
        return SloFile.model_validate(raw).slo
    except ValidationError as err:
        raise SloFileError(f"{path}: {err}") from err


Series = list[tuple[dict[str, str], float]]


class Source(Protocol):
    """Where samples come from: the series of `metric` whose labels include `labels`."""

    def series(self, metric: str, labels: Mapping[str, str]) -> Series: ...


def _matches(have: Mapping[str, str], want: Mapping[str, str]) -> bool:
    return all(have.get(k) == v for k, v in want.items())


class ScrapeSource:
    """A Prometheus text exposition (a scrape file)."""

    def __init__(self, text: str) -> None:
        self._samples: dict[str, Series] = defaultdict(list)
        try:
            for fam in text_string_to_metric_families(text):
                for s in fam.samples:
                    self._samples[s.name].append((dict(s.labels), float(s.value)))
        except ValueError as err:
            raise SourceError(f"not a Prometheus text exposition: {err}") from err

    @classmethod
    def from_file(cls, path: Path) -> ScrapeSource:
        try:
            return cls(path.read_text())
        except OSError as err:
            raise SourceError(f"{path}: {err}") from err

    def series(self, metric: str, labels: Mapping[str, str]) -> Series:
        return [(lab, v) for lab, v in self._samples.get(metric, []) if _matches(lab, labels)]


def promql_selector(metric: str, labels: Mapping[str, str]) -> str:
    """`metric{k="v",...}` with the values escaped as PromQL strings."""
    inner = ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(labels.items()))
    return f"{metric}{{{inner}}}" if inner else metric


class PrometheusSource:
    """A Prometheus server's HTTP API: instant queries of raw series at the time of the call."""

    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def query(self, promql: str) -> list[dict[str, object]]:
        """The instant vector of `promql` (SourceError when the server cannot answer)."""
        q = urllib.parse.urlencode({"query": promql})
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/query?{q}", timeout=self.timeout_s) as resp:
                body = json.loads(resp.read())
        except (OSError, urllib.error.URLError, ValueError) as err:
            raise SourceError(f"{self.url}: {err}") from err
        if body.get("status") != "success":
            raise SourceError(f"{self.url}: {promql}: {body.get('error', body)}")
        data = body["data"]
        if data.get("resultType") != "vector":
            raise SourceError(f"{self.url}: {promql}: a {data.get('resultType')}, not a vector")
        result: list[dict[str, object]] = data["result"]
        return result

    def series(self, metric: str, labels: Mapping[str, str]) -> Series:
        out: Series = []
        for item in self.query(promql_selector(metric, labels)):
            lab = item["metric"]
            value = item["value"]
            assert isinstance(lab, dict) and isinstance(value, list)
            out.append(({str(k): str(v) for k, v in lab.items()}, float(value[1])))
        return out


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float:
    """PromQL's histogram_quantile over cumulative (upper bound, count) buckets; NaN without data.

    Linear interpolation within the bucket holding the rank; the +Inf bucket answers the
    highest finite bound; the lowest bucket starts at 0 (as in Prometheus' quantile.go).
    """
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    bs = sorted(buckets)
    if len(bs) < 2 or not math.isinf(bs[-1][0]):
        return math.nan
    counts, top = [], 0.0
    for _, c in bs:  # counts of a scrape taken mid-update can dip: make them monotonic
        top = max(top, c)
        counts.append(top)
    observations = counts[-1]
    if observations == 0:
        return math.nan
    rank = q * observations
    b = next(i for i, c in enumerate(counts) if c >= rank)
    if b == len(bs) - 1:
        return bs[-2][0]
    if b == 0 and bs[0][0] <= 0:
        return bs[0][0]
    start, end, count = 0.0, bs[b][0], counts[b]
    if b > 0:
        start = bs[b - 1][0]
        count -= counts[b - 1]
        rank -= counts[b - 1]
    return start + (end - start) * (rank / count)


@dataclass
class Row:
    """One checked SLO."""

    name: str
    metric: str
    kind: str
    value: float | None  # None: no data
    threshold: str
    ok: bool
    note: str = ""

    @property
    def status(self) -> str:
        if self.value is None and self.ok:
            return "n/a"  # optional, no data
        return "ok" if self.ok else "BREACH"


class _NoData(Exception):
    pass


def _sum(source: Source, sel: Selector) -> float:
    got = source.series(sel.metric, sel.labels)
    if not got:
        raise _NoData(f"no series {sel.describe()}")
    return sum(v for _, v in got)


def _value(slo: ValueSlo | RatioSlo | QuantileSlo, source: Source) -> float:
    if isinstance(slo, ValueSlo):
        values = [v for _, v in source.series(slo.metric, slo.labels)]
        if not values:
            raise _NoData(f"no series {slo.describe()}")
        if slo.agg == "max":
            return max(values)
        return min(values) if slo.agg == "min" else sum(values)
    if isinstance(slo, RatioSlo):
        num, den = _sum(source, slo.numerator), _sum(source, slo.denominator)
        if den == 0:
            raise _NoData(f"{slo.denominator.describe()} is 0")
        return num / den
    by_le: dict[float, float] = defaultdict(float)
    for lab, v in source.series(f"{slo.metric}_bucket", slo.labels):
        if "le" in lab:
            by_le[float(lab["le"])] += v  # float() reads "+Inf"
    if not by_le:
        raise _NoData(f"no series {Selector(metric=f'{slo.metric}_bucket', labels=slo.labels).describe()}")
    value = histogram_quantile(slo.q, list(by_le.items()))
    if math.isnan(value):
        raise _NoData(f"{slo.metric}: no observations")
    return value


def _metric_of(slo: ValueSlo | RatioSlo | QuantileSlo) -> str:
    if isinstance(slo, ValueSlo):
        return f"{slo.agg}({slo.describe()})"
    if isinstance(slo, RatioSlo):
        return f"{slo.numerator.describe()} / {slo.denominator.describe()}"
    return f"q{slo.q:g}({slo.describe()})"


def check(slos: Sequence[ValueSlo | RatioSlo | QuantileSlo], source: Source) -> list[Row]:
    """Every SLO against `source` (SourceError propagates: a source that fails is no verdict)."""
    rows = []
    for slo in slos:
        metric, threshold = _metric_of(slo), slo.threshold()
        try:
            value = _value(slo, source)
        except _NoData as why:
            note = f"no data: {why}" + (" (optional)" if slo.optional else "")
            rows.append(Row(slo.name, metric, slo.kind, None, threshold, slo.optional, note))
            continue
        rows.append(Row(slo.name, metric, slo.kind, value, threshold, slo.holds(value)))
    return rows


def render(rows: Sequence[Row]) -> str:
    """The table: slo, metric, kind, value, threshold, ok (and why, for no data)."""
    head = ("slo", "metric", "kind", "value", "threshold", "ok")
    body = [
        (
            r.name,
            r.metric,
            r.kind,
            "-" if r.value is None else f"{r.value:.6g}",
            r.threshold,
            r.status + (f"  {r.note}" if r.note else ""),
        )
        for r in rows
    ]
    widths = [max(len(x[i]) for x in (head, *body)) for i in range(len(head) - 1)]
    lines = []
    for line in (head, *body):
        lines.append("  ".join([*(c.ljust(w) for c, w in zip(line[:-1], widths, strict=True)), line[-1]]).rstrip())
    breaches = sum(not r.ok for r in rows)
    lines.append(f"{len(rows)} SLOs: {breaches} breach(es)" if breaches else f"{len(rows)} SLOs: all hold")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="analyze_metrics", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("scrape", nargs="?", type=Path, help="a Prometheus text exposition (e.g. artifacts/metrics.txt)")
    p.add_argument("--slo", type=Path, required=True, help="the SLO file (TOML), e.g. deploy/slo/ci.toml")
    p.add_argument("--prometheus", help="a Prometheus server (http://host:9090) instead of a scrape file")
    p.add_argument("--timeout-s", type=float, default=10.0, help="per HTTP request to --prometheus")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Check, print the table; 0 all hold, 1 a breach, 2 bad SLO file or unreadable source."""
    args = parse_args(argv)
    if (args.scrape is None) == (args.prometheus is None):
        print("analyze_metrics: give a scrape file or --prometheus URL (one of them)", file=sys.stderr)
        return 2
    try:
        slos = load_slos(args.slo)
        source: Source = (
            PrometheusSource(args.prometheus, args.timeout_s)
            if args.prometheus
            else ScrapeSource.from_file(args.scrape)
        )
        rows = check(slos, source)
    except (SloFileError, SourceError) as err:
        print(f"analyze_metrics: {err}", file=sys.stderr)
        return 2
    print(render(rows))
    return 0 if all(r.ok for r in rows) else 1
