"""Environments by name, from the `primerl.envs` entry points (name -> factory(EnvContext) -> Environment).

A package adds an environment by declaring an entry point in that group; the built-in
ones are declared in this project's pyproject.toml. A source checkout whose installed
metadata predates an env (an editable install made before it was added) still finds
the built-ins through `BUILTIN`, so nothing needs reinstalling to run them.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from typing import cast

from envhub.protocol import EnvContext, Environment

GROUP = "primerl.envs"
# The built-ins, as pyproject.toml declares them (tests/test_envhub_registry.py checks they agree).
BUILTIN: dict[str, str] = {
    "calculator": "envhub.envs.calculator:make",
    "retrieval_qa": "envhub.envs.retrieval:make",
    "python": "envhub.envs.python:make",
}

Factory = Callable[[EnvContext], Environment]


class UnknownEnv(LookupError):
    """No environment of that name is installed."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"unknown environment {name!r}; known: {', '.join(known) or 'none'}")
        self.name = name
        self.known = known


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    found = {ep.name: ep for ep in importlib.metadata.entry_points(group=GROUP)}
    for name, value in BUILTIN.items():
        found.setdefault(name, importlib.metadata.EntryPoint(name, value, GROUP))
    return found


def known_envs() -> list[str]:
    """Names of every loadable environment, sorted."""
    return sorted(_entry_points())


def load_env(name: str, ctx: EnvContext) -> Environment:
    """A new environment `name` built by its factory; UnknownEnv lists the names there are."""
    eps = _entry_points()
    if name not in eps:
        raise UnknownEnv(name, sorted(eps))
    factory = cast(Factory, eps[name].load())
    return factory(ctx)
