"""The metrics guardrail (operations/analyze_metrics.py) and the scrape merge (perf/scrape.py) on small texts."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from operations.analyze_metrics import (
    ScrapeSource,
    SloFileError,
    check,
    histogram_quantile,
    load_slos,
    main,
    promql_selector,
)
from perf.scrape import merge

ROOT = Path(__file__).resolve().parents[1]

# Hand-made: 10 observations, 2 <= 0.1 s, 8 more <= 0.5 s (so 10 <= 0.5), none above.
SCRAPE = """\
# HELP primerl_engine_generated_tokens_total Tokens generated
# TYPE primerl_engine_generated_tokens_total counter
primerl_engine_generated_tokens_total{process="engine-0"} 120.0
primerl_engine_generated_tokens_total{process="engine-1"} 30.0
# HELP primerl_engine_prompt_tokens_total Prompt tokens
# TYPE primerl_engine_prompt_tokens_total counter
primerl_engine_prompt_tokens_total{process="engine-0"} 1000.0
# HELP primerl_engine_cached_prompt_tokens_total Cached prompt tokens
# TYPE primerl_engine_cached_prompt_tokens_total counter
primerl_engine_cached_prompt_tokens_total{process="engine-0"} 800.0
# HELP primerl_consumer_lag Records behind
# TYPE primerl_consumer_lag gauge
primerl_consumer_lag{group="engine",process="engine-0"} 3.0
primerl_consumer_lag{group="verifier",process="verifier"} 40.0
# HELP primerl_engine_ttfb_seconds TTFB
# TYPE primerl_engine_ttfb_seconds histogram
primerl_engine_ttfb_seconds_bucket{le="0.1",process="engine-0"} 2.0
primerl_engine_ttfb_seconds_bucket{le="0.5",process="engine-0"} 6.0
primerl_engine_ttfb_seconds_bucket{le="+Inf",process="engine-0"} 6.0
primerl_engine_ttfb_seconds_count{process="engine-0"} 6.0
primerl_engine_ttfb_seconds_sum{process="engine-0"} 1.5
primerl_engine_ttfb_seconds_bucket{le="0.1",process="engine-1"} 0.0
primerl_engine_ttfb_seconds_bucket{le="0.5",process="engine-1"} 4.0
primerl_engine_ttfb_seconds_bucket{le="+Inf",process="engine-1"} 4.0
primerl_engine_ttfb_seconds_count{process="engine-1"} 4.0
primerl_engine_ttfb_seconds_sum{process="engine-1"} 1.2
"""


def _slo_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "slo.toml"
    path.write_text(text)
    return path


def _run(tmp_path: Path, slos: str, scrape: str = SCRAPE, capsys: pytest.CaptureFixture[str] | None = None) -> int:
    (tmp_path / "metrics.txt").write_text(scrape)
    return main(["--slo", str(_slo_file(tmp_path, slos)), str(tmp_path / "metrics.txt")])


PASSING = """
[[slo]]
name = "decode tokens"
kind = "value"
metric = "primerl_engine_generated_tokens_total"
min = 1

[[slo]]
name = "engine-0 decode tokens"
kind = "value"
metric = "primerl_engine_generated_tokens_total"
labels = { process = "engine-0" }
min = 120
max = 120

[[slo]]
name = "cache hit rate"
kind = "ratio"
numerator = { metric = "primerl_engine_cached_prompt_tokens_total" }
denominator = { metric = "primerl_engine_prompt_tokens_total" }
min = 0.8

[[slo]]
name = "consumer lag"
kind = "value"
metric = "primerl_consumer_lag"
agg = "max"
max = 40

[[slo]]
name = "TTFB p95"
kind = "quantile"
metric = "primerl_engine_ttfb_seconds"
q = 0.95
max = 0.5

[[slo]]
name = "rewards rejected"
kind = "value"
metric = "primerl_learner_rewards_rejected_total"
max = 0
optional = true
"""


def test_every_slo_holds_exit_0_and_the_table_says_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(tmp_path, PASSING) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["slo", "metric", "kind", "value", "threshold", "ok"]
    assert "6 SLOs: all hold" in out
    assert "150" in out and "0.8" in out  # the sum over both engines, the hit rate
    assert "n/a" in out and "(optional)" in out  # the optional one without data


def test_a_breach_exits_1_and_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    slos = PASSING.replace('agg = "max"\nmax = 40', 'agg = "max"\nmax = 10')
    assert _run(tmp_path, slos) == 1
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("consumer lag"))
    assert "BREACH" in row and " 40 " in row
    assert "1 breach(es)" in out


def test_missing_data_is_a_breach_unless_optional(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = """
[[slo]]
name = "mask ratio"
kind = "value"
metric = "primerl_spec_accepted_mask_ratio"
agg = "min"
min = 1.0
max = 1.0
"""
    assert _run(tmp_path, missing) == 1
    out = capsys.readouterr().out
    assert "BREACH" in out and "no data: no series primerl_spec_accepted_mask_ratio" in out
    assert _run(tmp_path, missing + "optional = true\n") == 0
    # A ratio over a zero denominator, a histogram without observations: no data too.
    zero = SCRAPE.replace(
        'primerl_engine_prompt_tokens_total{process="engine-0"} 1000.0',
        'primerl_engine_prompt_tokens_total{process="engine-0"} 0.0',
    )
    rows = check(load_slos(_slo_file(tmp_path, PASSING)), ScrapeSource(zero))
    hit = next(r for r in rows if r.name == "cache hit rate")
    assert not hit.ok and hit.value is None and "is 0" in hit.note


def test_histogram_quantile_matches_a_hand_computed_value(tmp_path: Path) -> None:
    # Summed over both engines: le 0.1 -> 2, le 0.5 -> 10, +Inf -> 10. p95: rank 9.5 falls in
    # (0.1, 0.5], 2 below it, 8 in it: 0.1 + 0.4 * (9.5 - 2) / 8 = 0.475.
    rows = check(load_slos(_slo_file(tmp_path, PASSING)), ScrapeSource(SCRAPE))
    p95 = next(r for r in rows if r.name == "TTFB p95")
    assert p95.value == pytest.approx(0.475) and p95.ok
    # PromQL's rules: in the lowest bucket from 0; in the +Inf bucket the highest finite bound.
    assert histogram_quantile(0.5, [(1.0, 4.0), (2.0, 4.0), (math.inf, 4.0)]) == pytest.approx(0.5)
    assert histogram_quantile(0.99, [(1.0, 1.0), (2.0, 2.0), (math.inf, 10.0)]) == 2.0
    assert math.isnan(histogram_quantile(0.5, [(1.0, 0.0), (math.inf, 0.0)]))
    assert math.isnan(histogram_quantile(0.5, [(1.0, 3.0), (2.0, 3.0)]))  # no +Inf bucket


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("[[slo]\nname = 'x'", "TOML"),
        ("[[slo]]\nname = 'x'\nkind = 'value'\nmetric = 'm'\n", "min, max"),
        ("[[slo]]\nname = 'x'\nkind = 'median'\nmetric = 'm'\nmax = 1\n", "kind"),
        ("[[slo]]\nname = 'x'\nkind = 'value'\nmetric = 'm'\nmax = 1\nthreshhold = 2\n", "threshhold"),
        ("[[slo]]\nname = 'x'\nkind = 'quantile'\nmetric = 'm'\nq = 95\nmax = 1\n", "q"),
        ("[[slo]]\nname = 'x'\nkind = 'value'\nmetric = 'm{a=\"b\"}'\nmax = 1\n", "metric"),
        ("", "slo"),
    ],
)
def test_a_malformed_slo_file_exits_2(tmp_path: Path, text: str, why: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SloFileError, match=why):
        load_slos(_slo_file(tmp_path, text))
    assert _run(tmp_path, text) == 2
    assert "analyze_metrics:" in capsys.readouterr().err


def test_an_unreadable_source_exits_2(tmp_path: Path) -> None:
    slo = str(_slo_file(tmp_path, PASSING))
    assert main(["--slo", slo, str(tmp_path / "absent.txt")]) == 2
    assert main(["--slo", slo, "--prometheus", "http://127.0.0.1:9"]) == 2  # nothing listens on port 9
    assert main(["--slo", slo]) == 2  # neither source


def test_promql_selectors_escape_label_values() -> None:
    assert promql_selector("m", {}) == "m"
    assert promql_selector("m", {"b": 'x"y', "a": "1"}) == 'm{a="1",b="x\\"y"}'


def test_the_shipped_slo_files_load() -> None:
    for name in ("ci.toml", "bench.toml"):
        assert load_slos(ROOT / "deploy" / "slo" / name)


def test_the_script_and_the_cli_run_the_same_check(tmp_path: Path) -> None:
    (tmp_path / "metrics.txt").write_text(SCRAPE)
    slo = _slo_file(tmp_path, PASSING)
    for cmd in (
        [sys.executable, str(ROOT / "scripts" / "analyze_metrics.py")],
        [sys.executable, "-m", "primerl", "analyze-metrics"],
    ):
        got = subprocess.run(
            [*cmd, "--slo", str(slo), str(tmp_path / "metrics.txt")], cwd=ROOT, capture_output=True, text=True
        )
        assert got.returncode == 0, got.stderr
        assert "6 SLOs: all hold" in got.stdout


def _page(group: str, lag: float) -> str:
    registry = CollectorRegistry()
    Counter("primerl_records_consumed", "Records consumed", ["group"], registry=registry).labels(group).inc(5)
    Gauge("primerl_consumer_lag", "Records behind", ["group"], registry=registry).labels(group).set(lag)
    Histogram("primerl_engine_ttfb_seconds", "TTFB", registry=registry).observe(0.2)
    return generate_latest(registry).decode()


def test_the_merge_labels_every_sample_and_keeps_one_help_per_family() -> None:
    text = merge({"engine": _page("engine", 1), "verifier": _page("verifier", 2)})
    assert text.count("# TYPE primerl_consumer_lag gauge") == 1
    assert text.count("# HELP primerl_records_consumed_total") == 1
    assert 'primerl_consumer_lag{group="verifier",process="verifier"} 2.0' in text
    samples = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert samples and all('process="' in line for line in samples)
    source = ScrapeSource(text)
    assert [v for _, v in source.series("primerl_records_consumed_total", {})] == [5.0, 5.0]
    assert len(source.series("primerl_engine_ttfb_seconds_bucket", {"le": "+Inf"})) == 2


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool absent (Debian package prometheus)")
def test_the_merged_scrape_passes_promtool() -> None:
    text = merge({"engine": _page("engine", 1), "verifier": _page("verifier", 2)})
    got = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert got.returncode == 0, got.stdout + got.stderr


async def test_a_consumer_groups_counters_exist_at_zero_before_any_record(tmp_path: Path) -> None:
    """The DLQ share of a group that never dead-lettered is 0, not "no data" (plumbing/consumer.py)."""
    from typing import Any, cast

    from plumbing.config import load_config
    from plumbing.consumer import ConsumerRunner
    from schemas import PromptRequest

    async def handler(msg: PromptRequest, record: object) -> None:
        return None

    cfg = load_config(state_dir=tmp_path, kafka_bootstrap_servers="127.0.0.1:9", redis_url="redis://127.0.0.1:9/0")
    registry = CollectorRegistry()
    ConsumerRunner(
        cfg,
        topics=["t"],
        group_id="g",
        message_type=PromptRequest,
        handler=handler,
        dead_letters=cast(Any, None),  # never reached: nothing is consumed
        registry=registry,
    )
    for name in (
        "primerl_records_consumed_total",
        "primerl_records_dead_lettered_total",
        "primerl_records_retried_total",
    ):
        assert registry.get_sample_value(name, {"group": "g"}) == 0.0


def test_the_speculation_gauges_are_in_base_units_and_pass_promtool() -> None:
    """promtool's lint fails abbreviated units: the step cost is in seconds (it was _ms)."""
    from engine_workers.speculation.metrics import SpeculationCollector

    stats = {
        "forced_drafted": 10, "ngram_drafted": 5, "forced_accepted": 9, "ngram_accepted": 2, "forced_emitted": 9,
        "generated": 40, "fallbacks": 0, "grammar_tokens": 20, "grammar_tokens_accepted": 20,
        "sources_on": {"grammar": {"forced": 1, "ngram": 0}}, "drafting_by_batch": {"grammar": {"1": 1}},
        "break_even": 0.2, "step_fixed_ms": 90.0, "step_per_token_ms": 8.0,
    }  # fmt: skip
    registry = CollectorRegistry()
    registry.register(SpeculationCollector(lambda: stats))
    assert registry.get_sample_value("primerl_spec_step_cost_seconds", {"part": "fixed"}) == pytest.approx(0.09)
    assert registry.get_sample_value("primerl_spec_accepted_mask_ratio") == 1.0
    if shutil.which("promtool"):
        text = merge({"engine": generate_latest(registry).decode()})
        got = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        assert got.returncode == 0, got.stdout + got.stderr
