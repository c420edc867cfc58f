"""Fails when a stage folder imports another stage folder (contracts live in schemas/ and plumbing/).

Stages: the folders that run as consumer-group stages or publish into them. Tools that
drive several stages (primerl/, operations/, perf/, tests/) may import any of them;
schemas/ and plumbing/ may import no stage at all. Also fails on an import cycle
between top-level packages. Usage: `python scripts/check_imports.py` (exit 1 on a violation).
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"engine_workers", "verifier_workers", "learners", "producers", "router", "archiver", "envhub"}
NEUTRAL = {"schemas", "plumbing"}
TOOLS = {"primerl", "operations", "perf"}
PACKAGES = STAGES | NEUTRAL | TOOLS


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import in `path`."""
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module.split(".")[0]))
    return out


def violations() -> list[str]:
    found = []
    edges: dict[str, set[str]] = defaultdict(set)
    for pkg in sorted(PACKAGES):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for line, target in imports_of(path):
                if target not in PACKAGES or target == pkg:
                    continue
                edges[pkg].add(target)
                where = f"{path.relative_to(ROOT)}:{line}"
                if pkg in STAGES and target in STAGES:
                    found.append(f"{where}: stage {pkg} imports stage {target}")
                elif pkg in NEUTRAL and target not in NEUTRAL:
                    found.append(f"{where}: {pkg} (a contract home) imports {target}")
                elif pkg in STAGES | NEUTRAL and target in TOOLS:
                    found.append(f"{where}: {pkg} imports the tool package {target}")
    for a in sorted(edges):
        for b in sorted(edges[a]):
            if a in edges.get(b, set()) and a < b:
                found.append(f"import cycle between {a} and {b}")
    return found


def main() -> int:
    bad = violations()
    for v in bad:
        print(v)
    print(f"{len(bad)} import violation(s)" if bad else "imports: no stage imports another")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
