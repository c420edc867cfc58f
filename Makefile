# The two commands of the README. Both install what they need first.
.PHONY: up test bootstrap

bootstrap:
	./scripts/bootstrap.sh

# The main job on the embedded default (local broker, Redis, engine on the CPU).
up: bootstrap
	.venv/bin/primerl up

# The whole test suite, real servers and the real engine included.
test: bootstrap
	.venv/bin/python -m pytest -v -rs $(PYTEST_ARGS)
