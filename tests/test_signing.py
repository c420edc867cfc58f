"""Reward signatures: round trip, every field tamper-evident, unknown keys, rotation, replay."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from plumbing.trust import (
    Keyring,
    MemoryReplayGuard,
    RewardRejected,
    Signer,
    generate_keypair,
    verify_reward,
)
from schemas import Reward, RewardStatus


def _reward(**kw: object) -> Reward:
    base = dict(
        run_id="run",
        completion_id="req/0",
        request_id="req",
        group_id="g",
        prompt_hash="p" * 64,
        tokens_hash="t" * 64,
        policy_version=3,
        verifier_id="verifier-a",
        verifier_version="1.0",
        components={"correct": 1.0, "format": 1.0},
        scalar=1.0,
        status=RewardStatus.OK,
        trace={"answer": "42"},
    )
    base.update(kw)
    return Reward(**base)  # type: ignore[arg-type]


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Signer, Keyring]:
    priv, _ = generate_keypair(tmp_path, "k1")
    return Signer.from_file(priv), Keyring.from_dir(tmp_path)


async def test_round_trip(keys) -> None:
    signer, ring = keys
    signed = signer.sign(_reward())
    assert signed.key_id == "k1" and len(signed.signature) == 64
    await verify_reward(signed, ring, MemoryReplayGuard())


TAMPERS = {
    "id": "other",
    "run_id": "other",
    "completion_id": "req/1",
    "request_id": "x",
    "group_id": "h",
    "prompt_hash": "0" * 64,
    "tokens_hash": "1" * 64,
    "policy_version": 4,
    "verifier_id": "verifier-b",
    "verifier_version": "2.0",
    "components": {"correct": 0.0, "format": 1.0},
    "scalar": 0.5,
    "status": RewardStatus.POLICY_FAIL,
    "trace": {"answer": "41"},
    "created_at": 1.0,
}


@pytest.mark.parametrize("field", sorted(TAMPERS))
async def test_tampering_with_any_field_is_rejected(keys, field: str) -> None:
    signer, ring = keys
    signed = signer.sign(_reward())
    tampered = msgspec.structs.replace(signed, **{field: TAMPERS[field]})
    with pytest.raises(RewardRejected) as info:
        await verify_reward(tampered, ring, MemoryReplayGuard())
    assert info.value.reason == "bad_signature"


async def test_a_forged_key_id_or_signature_is_rejected(keys) -> None:
    signer, ring = keys
    signed = signer.sign(_reward())
    with pytest.raises(RewardRejected) as info:
        await verify_reward(msgspec.structs.replace(signed, key_id="k2"), ring, MemoryReplayGuard())
    assert info.value.reason == "unknown_key"
    with pytest.raises(RewardRejected) as info:
        await verify_reward(msgspec.structs.replace(signed, signature=bytes(64)), ring, MemoryReplayGuard())
    assert info.value.reason == "bad_signature"


async def test_a_key_outside_the_keyring_is_rejected(keys) -> None:
    _, ring = keys
    stranger = Signer("k1", Ed25519PrivateKey.generate())  # same id, different key
    with pytest.raises(RewardRejected) as info:
        await verify_reward(stranger.sign(_reward()), ring, MemoryReplayGuard())
    assert info.value.reason == "bad_signature"
    unknown = Signer("nobody", Ed25519PrivateKey.generate())
    with pytest.raises(RewardRejected) as info:
        await verify_reward(unknown.sign(_reward()), ring, MemoryReplayGuard())
    assert info.value.reason == "unknown_key"


async def test_rotation_old_key_accepted_until_retired(tmp_path: Path) -> None:
    old_priv, _ = generate_keypair(tmp_path, "old")
    new_priv, _ = generate_keypair(tmp_path, "new")
    old, new = Signer.from_file(old_priv), Signer.from_file(new_priv)
    ring = Keyring.from_dir(tmp_path)
    assert ring.key_ids() == ["new", "old"]
    guard = MemoryReplayGuard()
    before = old.sign(_reward())
    await verify_reward(before, ring, guard)
    await verify_reward(new.sign(_reward()), ring, guard)
    ring.retire("old", at=time.time())
    after = old.sign(_reward(created_at=time.time() + 1))
    with pytest.raises(RewardRejected) as info:
        await verify_reward(after, ring, guard)
    assert info.value.reason == "retired_key"
    # Signed before the retirement: still valid (in flight during the rotation).
    await verify_reward(old.sign(_reward(created_at=before.created_at)), ring, guard)
    await verify_reward(new.sign(_reward()), ring, guard)


async def test_replay_is_rejected(keys) -> None:
    signer, ring = keys
    guard = MemoryReplayGuard()
    signed = signer.sign(_reward())
    await verify_reward(signed, ring, guard)
    with pytest.raises(RewardRejected) as info:
        await verify_reward(signed, ring, guard)
    assert info.value.reason == "replay"


def test_private_key_file_is_private(tmp_path: Path) -> None:
    priv, pub = generate_keypair(tmp_path, "k")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in priv.read_bytes() and b"PUBLIC KEY" in pub.read_bytes()
    with pytest.raises(FileExistsError):
        generate_keypair(tmp_path, "k")  # never overwrites a key
