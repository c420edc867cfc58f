"""Environments by name: entry points of group primerl.envs, the built-in fallback, unknown names."""

from __future__ import annotations

import importlib.metadata
import sys
import tomllib
import types
from pathlib import Path

import pytest

from envhub import registry
from envhub.envs.calculator import CalculatorEnv
from envhub.protocol import EnvContext, Reset, StepResult
from envhub.registry import BUILTIN, GROUP, UnknownEnv, known_envs, load_env

CTX = EnvContext()


class EchoEnv:
    """A third-party environment, as a plugin package would ship one."""

    name = "echo"
    tools: tuple[str, ...] = ()

    def __init__(self, ctx: EnvContext) -> None:
        self.ctx = ctx

    def reset(self, instance: dict[str, str]) -> Reset:
        return Reset(messages=[])

    async def step(self, state: str, turn_index: int, model_text: str, *, stopped_at_close: bool = False) -> StepResult:
        return StepResult(observation=model_text, done=False)

    async def aclose(self) -> None:
        pass


@pytest.fixture
def plugin(monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    """An installed plugin: a module on sys.modules and an entry point for it (what `pip install` would add)."""
    module = types.ModuleType("primerl_echo_plugin")
    module.make = EchoEnv  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "primerl_echo_plugin", module)
    asked: list[str | None] = []
    real = importlib.metadata.entry_points

    def entry_points(**kwargs: str) -> importlib.metadata.EntryPoints:
        asked.append(kwargs.get("group"))
        if kwargs.get("group") != GROUP:
            return real(**kwargs)
        return importlib.metadata.EntryPoints(
            [
                importlib.metadata.EntryPoint("echo", "primerl_echo_plugin:make", GROUP),
                # An installed package may also point a built-in name elsewhere: the installed one wins.
                importlib.metadata.EntryPoint("calculator", "primerl_echo_plugin:make", GROUP),
            ]
        )

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    return asked


def test_an_entry_point_env_loads(plugin: list[str | None]) -> None:
    env = load_env("echo", CTX)
    assert isinstance(env, EchoEnv) and env.ctx is CTX and plugin == [GROUP]
    assert isinstance(load_env("calculator", CTX), EchoEnv)
    assert known_envs() == sorted({"echo", *BUILTIN})


def test_builtins_load_without_an_install(monkeypatch: pytest.MonkeyPatch) -> None:
    # The editable install in the venv predates envhub: no entry points of the group at all.
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **_: importlib.metadata.EntryPoints([]))
    assert known_envs() == ["calculator", "python", "retrieval_qa"]
    env = load_env("calculator", CTX)
    assert isinstance(env, CalculatorEnv) and env.name == "calculator" and env.tools == ("calculator",)
    for name in BUILTIN:
        assert load_env(name, CTX).name == name


def test_unknown_env_lists_the_known_ones(plugin: list[str | None]) -> None:
    with pytest.raises(UnknownEnv) as err:
        load_env("chess", CTX)
    assert err.value.name == "chess" and err.value.known == known_envs()
    assert str(err.value) == "unknown environment 'chess'; known: calculator, echo, python, retrieval_qa"
    assert isinstance(err.value, LookupError)


def test_pyproject_declares_the_builtins() -> None:
    pyproject = tomllib.loads((Path(registry.__file__).parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["entry-points"][GROUP] == BUILTIN
