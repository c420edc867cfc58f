"""Ed25519 signatures on rewards: key files, a keyring with rotation, and the one check learners use.

The signature covers a canonical encoding (msgpack of a fixed-order list) of every
field a learner trusts: ids, prompt and token hashes, policy version, verifier id and
version, components, scalar, status and the signing time. Any change to one of them
breaks the signature.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Protocol

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from schemas import Reward

_DOMAIN = "primerl-reward-v1"  # so a signature over another kind of message never verifies here


class RewardRejected(ValueError):
    """A reward a learner must not train on; `reason` is a short machine-readable tag."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def digest(data: bytes) -> str:
    """Hex SHA-256, the hash used for prompts and tokens."""
    return hashlib.sha256(data).hexdigest()


def token_hash(token_ids: list[int]) -> str:
    """Hash of a token-id sequence (its msgpack encoding)."""
    return digest(msgspec.msgpack.encode(token_ids))


def canonical_bytes(r: Reward) -> bytes:
    """The exact bytes signed for `r` (signature and key id excluded, key id bound separately)."""
    return msgspec.msgpack.encode(
        [
            _DOMAIN,
            r.key_id,
            r.id,
            r.run_id,
            r.completion_id,
            r.request_id,
            r.group_id,
            r.prompt_hash,
            r.tokens_hash,
            r.policy_version,
            r.verifier_id,
            r.verifier_version,
            sorted(r.components.items()),
            r.scalar,
            r.status.value,
            sorted(r.trace.items()),
            r.created_at,
        ]
    )


class Signer:
    """Signs rewards with one private key."""

    def __init__(self, key_id: str, private_key: Ed25519PrivateKey) -> None:
        self.key_id = key_id
        self._key = private_key

    def sign(self, reward: Reward) -> Reward:
        """A copy of `reward` with this key's id and signature."""
        unsigned = msgspec.structs.replace(reward, key_id=self.key_id, signature=b"")
        return msgspec.structs.replace(unsigned, signature=self._key.sign(canonical_bytes(unsigned)))

    @classmethod
    def from_file(cls, path: Path) -> Signer:
        """Load `<key_id>.key` (PEM, PKCS#8); the key id is the file's stem."""
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} is not an Ed25519 private key")
        return cls(path.stem, key)


def generate_keypair(out_dir: Path, key_id: str | None = None) -> tuple[Path, Path]:
    """Write `<key_id>.key` (mode 0600) and `<key_id>.pub` to `out_dir`; returns both paths."""
    key_id = key_id or f"verifier-{time.strftime('%Y%m%d')}-{os.urandom(3).hex()}"
    out_dir.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    priv = out_dir / f"{key_id}.key"
    pub = out_dir / f"{key_id}.pub"
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    # Created with 0600 from the start: never a moment where others can read it.
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return priv, pub


class _Entry(msgspec.Struct):
    key: Ed25519PublicKey
    retired_at: float | None = None


class Keyring:
    """Trusted public keys by key id. Rotation: add the new key, keep the old one until
    `retire`; a reward signed after its key's retirement time is rejected."""

    def __init__(self) -> None:
        self._keys: dict[str, _Entry] = {}

    def add(self, key_id: str, key: Ed25519PublicKey) -> None:
        """Trust `key` under `key_id`."""
        self._keys[key_id] = _Entry(key)

    def retire(self, key_id: str, at: float | None = None) -> None:
        """Stop accepting rewards signed by `key_id` after `at` (default: now)."""
        self._keys[key_id].retired_at = time.time() if at is None else at

    def key_ids(self) -> list[str]:
        """Ids of all known keys, retired ones included."""
        return sorted(self._keys)

    @classmethod
    def from_dir(cls, folder: Path) -> Keyring:
        """Every `<key_id>.pub` in `folder`."""
        ring = cls()
        for pub in sorted(folder.glob("*.pub")):
            key = serialization.load_pem_public_key(pub.read_bytes())
            if not isinstance(key, Ed25519PublicKey):
                raise ValueError(f"{pub} is not an Ed25519 public key")
            ring.add(pub.stem, key)
        return ring

    def check_signature(self, reward: Reward) -> None:
        """Raise RewardRejected unless `reward` carries a valid signature of a live key."""
        entry = self._keys.get(reward.key_id)
        if entry is None:
            raise RewardRejected("unknown_key", f"key id {reward.key_id!r} is not in the keyring")
        if entry.retired_at is not None and reward.created_at > entry.retired_at:
            raise RewardRejected("retired_key", f"key {reward.key_id!r} was retired before this reward was signed")
        try:
            entry.key.verify(reward.signature, canonical_bytes(reward))
        except InvalidSignature:
            raise RewardRejected("bad_signature", f"reward {reward.id} does not match its signature") from None


class ReplayGuard(Protocol):
    """Remembers reward ids; `first_time` is True once per id."""

    async def first_time(self, reward_id: str) -> bool: ...


class MemoryReplayGuard:
    """An in-process ReplayGuard (tests, replays); learners use the Redis ledger."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    async def first_time(self, reward_id: str) -> bool:
        if reward_id in self._seen:
            return False
        self._seen.add(reward_id)
        return True


async def verify_reward(reward: Reward, keyring: Keyring, replay: ReplayGuard) -> None:
    """The learners' single check: key known and live, signature valid, id never seen before.

    Raises RewardRejected with reason unknown_key, retired_key, bad_signature or replay.
    """
    keyring.check_signature(reward)
    if not await replay.first_time(reward.id):
        raise RewardRejected("replay", f"reward {reward.id} was already accepted once")
