"""The typed config: the shipped example loads, bad values fail at load time, overrides merge, nothing writes the
environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from plumbing.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "primerl.example.toml"


def test_the_example_config_loads_and_is_every_default() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.model_dump() == Config().model_dump()


def test_the_example_config_is_current(tmp_path: Path) -> None:
    out = tmp_path / "example.toml"
    subprocess.run([sys.executable, str(ROOT / "scripts/example_config.py"), str(out)], check=True, cwd=ROOT)
    assert out.read_text() == EXAMPLE.read_text(), "regenerate with: python scripts/example_config.py"


def test_a_file_overrides_defaults_and_the_environment_overrides_the_file(tmp_path: Path, monkeypatch) -> None:
    f = tmp_path / "p.toml"
    f.write_text('run_id = "from-file"\n[engine]\nmax_in_flight = 3\nmodel = "m"\n')
    before = dict(os.environ)
    cfg = load_config(f)
    assert (cfg.run_id, cfg.engine.max_in_flight, cfg.engine.model) == ("from-file", 3, "m")
    assert dict(os.environ) == before  # loading never writes the environment
    monkeypatch.setenv("PRIMERL_ENGINE__MAX_IN_FLIGHT", "5")
    cfg = load_config(f, **{"engine.model": "cli"})
    assert (cfg.engine.max_in_flight, cfg.engine.model) == (5, "cli")  # env over file, CLI over both, sections merged


@pytest.mark.parametrize(
    "override",
    [
        {"engine.max_in_flight": 0},
        {"routing.policy": "random"},
        {"learner.algo": "dpo"},
        {"engine.dtype": "int3"},
        {"kafka.heartbeat_interval_ms": 9000},
        {"routing.ttl_s": 0.5},
        {"learner.lr": -1.0},
    ],
)
def test_bad_values_fail_at_load_time_naming_the_field(override: dict) -> None:
    with pytest.raises(ValidationError) as err:
        load_config(**override)
    assert next(iter(override)).split(".")[0] in str(err.value)


def test_a_typo_in_a_section_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "typo.toml"
    f.write_text("[engine]\nmax_inflight = 3\n")
    with pytest.raises(ValidationError, match="max_inflight"):
        load_config(f)


def test_derive_copies_and_validates() -> None:
    cfg = Config()
    run = cfg.derive(**{"engine.policy_run": "r1", "run_id": "r1"})
    assert (run.engine.policy_run, run.run_id, cfg.engine.policy_run, cfg.run_id) == ("r1", "r1", "", "default")
    with pytest.raises(ValidationError):
        cfg.derive(**{"engine.max_in_flight": -1})


def test_every_field_says_what_it_is() -> None:
    from pydantic import BaseModel

    missing = []
    for name, f in Config.model_fields.items():
        if not f.description:
            missing.append(name)
        if isinstance(f.default, BaseModel):
            missing += [f"{name}.{n}" for n, ff in type(f.default).model_fields.items() if not ff.description]
    assert missing == []
