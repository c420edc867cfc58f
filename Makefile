# The two commands of the README. Both install what they need first.
.PHONY: up test fuzz bootstrap

bootstrap:
	./scripts/bootstrap.sh

# The main job on the embedded default (local broker, Redis, engine on the CPU).
up: bootstrap
	.venv/bin/primerl up

# The whole test suite, real servers and the real engine included.
test: bootstrap
	.venv/bin/python -m pytest -v -rs $(PYTEST_ARGS)

# The fuzz suite of issue 17 at 10,000 malformed payloads per input topic (the default
# suite runs the 1,000-per-topic version). PRIMERL_FUZZ_N=... to change the count.
fuzz: bootstrap
	PRIMERL_FUZZ_N=$${PRIMERL_FUZZ_N:-10000} .venv/bin/python -m pytest -v -rs -m fuzz tests/fuzz $(PYTEST_ARGS)
