"""The Grafana dashboard (deploy/grafana/primerl.json) against a real Prometheus.

The offline tests check that the dashboard and its provisioning files are what Grafana
loads. The integration test runs Debian's `prometheus` binary (a temp config and data
dir, a free port, a 1 s scrape interval) against perf/guardrail_run.py's short real
stack, evaluates every PromQL expression of the dashboard through /api/v1/query and
requires each to return a finite value, then runs the guardrail (deploy/slo/ci.toml) in
its Prometheus mode against the same server.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from operations.analyze_metrics import main as analyze_metrics
from perf.guardrail_run import ShortRun
from plumbing.local_servers import free_port

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = json.loads((GRAFANA / "primerl.json").read_text())
PANELS = (
    "tokens/s",
    "first byte",
    "p95",
    "hit rate",
    "acceptance",
    "mask",
    "dead letters",
    "consumer lag",
    "policy lag",
    "reward mean",
    "reload",
)


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel."""
    return [(p["title"], t["expr"]) for p in DASHBOARD["panels"] for t in p["targets"]]


def evaluable(expr: str, window: str) -> str:
    """The expression as Prometheus takes it: Grafana's range variables become `window`."""
    out = re.sub(r"\$__(rate_interval|interval|range)\b", window, expr)
    assert "$" not in out, f"a Grafana variable the test cannot evaluate: {expr}"
    return out


def test_the_dashboard_is_provisionable_and_has_every_panel() -> None:
    assert DASHBOARD["schemaVersion"] >= 39 and DASHBOARD["uid"] and DASHBOARD["id"] is None
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    titles = " | ".join(p["title"].lower() for p in DASHBOARD["panels"])
    for wanted in PANELS:
        assert wanted in titles, f"no panel for {wanted}: {titles}"
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(set(ids)) == len(ids)
    for p in DASHBOARD["panels"]:
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        assert p["targets"] and all(t["expr"] and t["datasource"] == p["datasource"] for t in p["targets"])
    for _, expr in dashboard_queries():
        assert "primerl_" in expr
        evaluable(expr, "1m")
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    assert ds["apiVersion"] == 1 and ds["datasources"][0]["type"] == "prometheus"
    boards = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "primerl.yaml").read_text())
    assert boards["providers"][0]["type"] == "file" and boards["providers"][0]["options"]["path"]


def test_every_dashboard_metric_is_defined_in_the_code() -> None:
    """Each metric name the dashboard reads is one the code registers (a renamed metric breaks a panel)."""
    code = "\n".join(
        p.read_text() for d in ("engine_workers", "plumbing", "learners", "router") for p in (ROOT / d).rglob("*.py")
    )
    for title, expr in dashboard_queries():
        for name in set(re.findall(r"\bprimerl_[a-z0-9_]+", expr)):
            base = re.sub(r"(_total|_bucket|_sum|_count)$", "", name)
            assert f'"{base}"' in code, f"{title}: {name} is not a metric of the code"


class Prometheus:
    """A `prometheus` server scraping `targets` (process name -> /metrics URL) every second."""

    def __init__(self, work: Path, targets: dict[str, str]) -> None:
        self.work = work
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.targets = targets
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Prometheus:
        self.work.mkdir(parents=True, exist_ok=True)
        static = [
            {"targets": [urllib.parse.urlparse(url).netloc], "labels": {"process": name}}
            for name, url in self.targets.items()
        ]
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "primerl", "static_configs": static}],
        }
        (self.work / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = open(self.work / "prometheus.log", "wb")  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={self.work / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.work / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()

    def get(self, path: str, **params: str) -> Any:
        q = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{q}", timeout=10) as resp:
            return json.loads(resp.read())

    def wait_scraping(self, timeout_s: float = 60) -> None:
        """Until every target has been scraped successfully once."""
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, (self.work / "prometheus.log").read_text()
            try:
                last = self.get("/api/v1/targets")["data"]["activeTargets"]
                if len(last) == len(self.targets) and all(t["health"] == "up" for t in last):
                    return
            except OSError:
                pass  # not listening yet
            time.sleep(0.5)
        raise TimeoutError(f"targets not all up after {timeout_s}s: {last}")

    def query(self, promql: str) -> list[dict[str, Any]]:
        body = self.get("/api/v1/query", query=promql)
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result


@pytest.mark.integration
@pytest.mark.engine
@pytest.mark.guardrail
@pytest.mark.timeout(900)
async def test_every_dashboard_query_returns_data_from_a_real_prometheus(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if shutil.which("prometheus") is None:
        pytest.skip("the prometheus binary is absent (Debian package prometheus; scripts/bootstrap.sh installs it)")
    t0 = time.monotonic()
    async with ShortRun(tmp_path / "stack") as run:
        targets = run.targets()
        assert set(targets) == {"engine", "verifier", "learner", "archiver"}, targets
        with Prometheus(tmp_path / "prometheus", targets) as prom:
            prom.wait_scraping()
            scraping_since = time.time()
            summary = await run.drive()
            assert summary["settled"], summary
            time.sleep(2)  # two more scrapes after the run settled
            # One window over the whole run: every event of the run is inside it.
            window = f"{math.ceil(time.time() - scraping_since) + 30}s"
            empty = []
            for title, expr in dashboard_queries():
                result = prom.query(evaluable(expr, window))
                if not any(math.isfinite(float(r["value"][1])) for r in result):
                    empty.append(f"{title}: {expr} -> {result}")
            assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
            assert analyze_metrics(["--slo", str(ROOT / "deploy" / "slo" / "ci.toml"), "--prometheus", prom.url]) == 0
    with capsys.disabled():
        print(f"\n[dashboard] {len(dashboard_queries())} queries with data; {summary}; {time.monotonic() - t0:.0f}s")
