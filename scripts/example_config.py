"""Writes primerl.example.toml from the Config's own fields (defaults and docstrings):
`python scripts/example_config.py [OUT]`."""

from __future__ import annotations

import sys
import textwrap

from pydantic import BaseModel

from plumbing.config import Config


def value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(value(x) for x in v) + "]"
    return '"' + str(v) + '"'


def render() -> str:
    """The example file's text."""
    out = [
        "# Every setting with its default "
        "(generated from plumbing/config.py; `primerl --config FILE` or PRIMERL_CONFIG).",
        "# Precedence: CLI > environment (PRIMERL_SECTION__FIELD) > this file > `primerl infra up` > defaults.",
        "",
    ]
    sections = []
    for name, f in Config.model_fields.items():
        default = f.default
        if isinstance(default, BaseModel):
            sections.append((name, f, default))
            continue
        for line in textwrap.wrap(f.description or "", 100):
            out.append(f"# {line}")
        out.append(
            f"# {name} = {value(default)}"
            if default is None or name in ("redis_url", "kafka_bootstrap_servers")
            else f"{name} = {value(default)}"
        )
    for name, _, default in sections:
        doc = type(default).__doc__
        assert doc, f"config section {name} needs a docstring"
        out += ["", f"[{name}]", f"# {doc.splitlines()[0]}"]
        for fname, ff in type(default).model_fields.items():
            for line in textwrap.wrap(" ".join((ff.description or "").split()), 100):
                out.append(f"# {line}")
            d = ff.default
            out.append(f"# {fname} =" if d is None else f"{fname} = {value(d)}")
    return "\n".join(out) + "\n"


def main() -> None:
    """Write the example to argv[1] (default: primerl.example.toml)."""
    with open(sys.argv[1] if len(sys.argv) > 1 else "primerl.example.toml", "w") as f:
        f.write(render())


if __name__ == "__main__":
    main()
