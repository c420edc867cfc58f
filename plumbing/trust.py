"""Ed25519 signatures on completions and rewards: key files, keyrings with rotation, the checks.

Two links of custody, one mechanism:

- an engine worker signs every final Completion (`completion_bytes`: ids, policy
  version, prompt and its token ids, output token ids, log-probs, text, finish reason,
  task and reference); verifiers and learners check it against the engine keyring
  (`<state_dir>/keys/engine/*.pub`);
- a verifier signs every Reward (`canonical_bytes`: ids, prompt and token hashes,
  policy version, verifier id and version, components, scalar, status, trace, time);
  learners check it against the verifier keyring (`<state_dir>/keys/*.pub`);
- between the two, for multi-turn sessions, the env hub signs every Trajectory
  wrapper (`trajectory_bytes`: its ids, the engine signature of the completion it
  wraps, done reason, turns, tool-use components, time); verifiers check it against
  the env hub keyring (`<state_dir>/keys/envhub/*.pub`) before copying the components
  into a reward.

Each canonical encoding is msgpack of a fixed-order list that starts with its own
domain tag, so a signature over one kind of message never verifies as the other. Any
change to a covered field breaks the signature.

Key folders: `<key_id>.key` (PEM PKCS#8, mode 0600), `<key_id>.pub` (PEM SPKI) and,
once retired, `<key_id>.retired` (the Unix time after which its signatures are refused).
Signers use the newest key without a `.retired` marker and follow the folder: a
FolderSigner looks at the folder's mtime before each signature and switches to the
newest live key when it changed. Keyrings re-read their folder whenever its mtime
changed (and, for an unknown key id, at most once a second otherwise), so a key made
by `primerl keys rotate` is used and trusted at once, without a restart, and a
rotation with no grace at all loses nothing (tests/test_custody_stack.py).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from schemas import Completion, Reward, Trajectory

_DOMAIN = "primerl-reward-v1"  # so a signature over another kind of message never verifies here
_COMPLETION_DOMAIN = "primerl-completion-v1"
_TRAJECTORY_DOMAIN = "primerl-trajectory-v1"

Signed = TypeVar("Signed", Reward, Completion, Trajectory)


class Rejected(ValueError):
    """A completion or reward a stage must not use; `reason` is a short machine-readable tag."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


RewardRejected = Rejected  # the name from when only rewards were signed


def digest(data: bytes) -> str:
    """Hex SHA-256, the hash used for prompts and tokens."""
    return hashlib.sha256(data).hexdigest()


def token_hash(token_ids: list[int]) -> str:
    """Hash of a token-id sequence (its msgpack encoding)."""
    return digest(msgspec.msgpack.encode(token_ids))


def prompt_hash(prompt: str) -> str:
    """Hash of a prompt's text (what a reward's `prompt_hash` holds)."""
    return digest(prompt.encode())


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


def completion_bytes(c: Completion) -> bytes:
    """The exact bytes an engine signs for `c`: everything a verifier scores or a learner trains on.

    Timings, cache statistics and the route are left out (observability, not custody).
    Task, reference and grammar are in: they decide the reward. So is an environment
    session's layout: it says which prompt tokens were sampled and which were tool responses.
    """
    return msgspec.msgpack.encode(
        [
            _COMPLETION_DOMAIN,
            c.engine_key_id,
            c.id,
            c.run_id,
            c.request_id,
            c.group_id,
            c.group_size,
            c.sample_index,
            c.session_id,
            c.turn_index,
            c.policy_version,
            c.prompt,
            c.prompt_token_ids,
            c.token_ids,
            c.logprobs,
            c.text,
            c.finish_reason,
            c.task,
            c.reference,
            c.grammar,
            c.worker_id,
            c.created_at,
        ]
        # Only when set, so a single-turn completion's bytes (and signature) are what they were.
        + ([c.session] if c.session is not None else [])
    )


def trajectory_bytes(t: Trajectory) -> bytes:
    """The exact bytes the env hub signs for `t`: the wrapper's own fields, bound to the wrapped
    completion by its id and engine signature (which covers the completion's every token)."""
    return msgspec.msgpack.encode(
        [
            _TRAJECTORY_DOMAIN,
            t.key_id,
            t.id,
            t.run_id,
            t.completion.id,
            t.completion.engine_key_id,
            t.completion.engine_signature,
            t.done_reason,
            t.turns,
            sorted(t.components.items()),
            t.created_at,
        ]
    )


def _signed_fields(msg: Reward | Completion | Trajectory) -> tuple[str, bytes, bytes]:
    """(key id, signature, signed bytes) of a reward, a completion or a trajectory."""
    if isinstance(msg, Reward):
        return msg.key_id, msg.signature, canonical_bytes(msg)
    if isinstance(msg, Trajectory):
        return msg.key_id, msg.signature, trajectory_bytes(msg)
    return msg.engine_key_id, msg.engine_signature, completion_bytes(msg)


def _with_signature(msg: Signed, key_id: str, sign: Callable[[bytes], bytes]) -> Signed:
    if isinstance(msg, Reward):
        unsigned_r = msgspec.structs.replace(msg, key_id=key_id, signature=b"")
        return msgspec.structs.replace(unsigned_r, signature=sign(canonical_bytes(unsigned_r)))
    if isinstance(msg, Trajectory):
        unsigned_t = msgspec.structs.replace(msg, key_id=key_id, signature=b"")
        return msgspec.structs.replace(unsigned_t, signature=sign(trajectory_bytes(unsigned_t)))
    unsigned_c = msgspec.structs.replace(msg, engine_key_id=key_id, engine_signature=b"")
    return msgspec.structs.replace(unsigned_c, engine_signature=sign(completion_bytes(unsigned_c)))


class Signer:
    """Signs rewards (verifiers), completions (engines) or trajectories (env hubs) with one private key."""

    def __init__(self, key_id: str, private_key: Ed25519PrivateKey) -> None:
        self.key_id = key_id
        self._key = private_key

    def sign(self, msg: Signed) -> Signed:
        """A copy of `msg` with this key's id and signature (a reward's or trajectory's
        key_id/signature, a completion's engine_key_id/engine_signature)."""
        return _with_signature(msg, self.key_id, self._key.sign)

    @classmethod
    def from_file(cls, path: Path) -> Signer:
        """Load `<key_id>.key` (PEM, PKCS#8); the key id is the file's stem."""
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} is not an Ed25519 private key")
        return cls(path.stem, key)


def new_key_id(role: str) -> str:
    """`<role>-<date>-<random>`: sortable by day, unique without coordination."""
    return f"{role}-{time.strftime('%Y%m%d')}-{os.urandom(3).hex()}"


def generate_keypair(out_dir: Path, key_id: str | None = None, role: str = "verifier") -> tuple[Path, Path]:
    """Write `<key_id>.key` (mode 0600) and `<key_id>.pub` to `out_dir`; returns both paths."""
    key_id = key_id or new_key_id(role)
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


def retired_at(folder: Path, key_id: str) -> float | None:
    """When `key_id` stops being accepted (its `.retired` marker), or None while it is live."""
    marker = folder / f"{key_id}.retired"
    try:
        return float(marker.read_text().strip())
    except FileNotFoundError:
        return None


def retire_key(folder: Path, key_id: str, at: float | None = None) -> float:
    """Mark `key_id` retired from `at` (default: now): signatures made later are refused,
    signers stop choosing it. Returns the time written."""
    if not (folder / f"{key_id}.pub").exists():
        raise FileNotFoundError(f"no public key {key_id}.pub in {folder}")
    when = time.time() if at is None else at
    (folder / f"{key_id}.retired").write_text(f"{when:.6f}\n")
    return when


class KeyInfo(msgspec.Struct, frozen=True):
    """One key of a folder, as `primerl keys list` shows it."""

    key_id: str
    has_private: bool
    retired_at: float | None
    created_at: float


def list_keys(folder: Path) -> list[KeyInfo]:
    """Every key with a public half in `folder`, oldest first."""
    out = [
        KeyInfo(pub.stem, pub.with_suffix(".key").exists(), retired_at(folder, pub.stem), pub.stat().st_mtime)
        for pub in folder.glob("*.pub")
    ]
    return sorted(out, key=lambda k: (k.created_at, k.key_id))


def newest_live_key(folder: Path) -> Path | None:
    """The private key a signer should use: the newest one without a `.retired` marker."""
    live = [k for k in list_keys(folder) if k.has_private and k.retired_at is None]
    return folder / f"{live[-1].key_id}.key" if live else None


def _mtime_ns(folder: Path) -> int:
    try:
        return folder.stat().st_mtime_ns
    except FileNotFoundError:
        return -1


class FolderSigner(Signer):
    """Signs with the newest live key of a folder and follows rotations in it.

    Before each signature it stats the folder (~1 us; a signature is ~50 us) and, when the
    mtime moved (a key made, a `.retired` marker written), re-reads which key is newest.
    A signer that kept its first key would sign past that key's retirement, and every such
    message would be refused; with this one a rotation needs no restart and loses nothing.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._seen = -2
        path = newest_live_key(folder)
        if path is None:
            raise FileNotFoundError(f"no live private key in {folder}")
        loaded = Signer.from_file(path)
        super().__init__(loaded.key_id, loaded._key)
        self._seen = _mtime_ns(folder)

    def _follow(self) -> None:
        now = _mtime_ns(self.folder)
        if now == self._seen:
            return
        self._seen = now
        path = newest_live_key(self.folder)
        if path is not None and path.stem != self.key_id:
            loaded = Signer.from_file(path)
            self.key_id, self._key = loaded.key_id, loaded._key

    def sign(self, msg: Signed) -> Signed:
        self._follow()
        return super().sign(msg)


def load_or_create_signer(folder: Path, role: str) -> tuple[FolderSigner, bool]:
    """A FolderSigner over `folder`, generating its first key on first use; (signer, generated)."""
    generated = newest_live_key(folder) is None
    if generated:
        generate_keypair(folder, role=role)
    return FolderSigner(folder), generated


def rotate_keys(folder: Path, role: str, grace_s: float, key_id: str | None = None) -> tuple[Path, list[str]]:
    """A new key pair in `folder`; every other live key is retired `grace_s` from now (what
    was signed before then, in flight during the rotation, stays valid). Returns the new
    private key and the ids retired."""
    priv, _ = generate_keypair(folder, key_id, role=role)
    at = time.time() + grace_s
    old = [k.key_id for k in list_keys(folder) if k.retired_at is None and k.key_id != priv.stem]
    for kid in old:
        retire_key(folder, kid, at)
    return priv, old


class _Entry(msgspec.Struct):
    key: Ed25519PublicKey
    retired_at: float | None = None


class Keyring:
    """Trusted public keys by key id. Rotation: add the new key, keep the old one until
    `retire`; a message signed after its key's retirement time is rejected.

    One built `from_dir` re-reads its folder (new keys, `.retired` markers) when it meets
    an unknown key id, at most once per `refresh_s`, and at least every `reread_s` (so a
    retirement reaches a running checker).
    """

    def __init__(self, folder: Path | None = None, refresh_s: float = 1.0, reread_s: float = 30.0) -> None:
        self._keys: dict[str, _Entry] = {}
        self._folder = folder
        self._refresh_s = refresh_s
        self._reread_s = reread_s
        self._read_at = 0.0
        self._read_mtime = -2

    def add(self, key_id: str, key: Ed25519PublicKey, retired_at: float | None = None) -> None:
        """Trust `key` under `key_id`."""
        self._keys[key_id] = _Entry(key, retired_at)

    def retire(self, key_id: str, at: float | None = None) -> None:
        """Stop accepting messages signed by `key_id` after `at` (default: now)."""
        self._keys[key_id].retired_at = time.time() if at is None else at

    def key_ids(self) -> list[str]:
        """Ids of all known keys, retired ones included."""
        return sorted(self._keys)

    @classmethod
    def from_dir(cls, folder: Path, refresh_s: float = 1.0, reread_s: float = 30.0) -> Keyring:
        """Every `<key_id>.pub` in `folder` (retired as its `.retired` marker says)."""
        ring = cls(folder, refresh_s, reread_s)
        ring.refresh()
        return ring

    def refresh(self) -> None:
        """Re-read the folder this keyring was built from (no-op for one built by hand)."""
        if self._folder is None:
            return
        self._read_at = time.monotonic()
        self._read_mtime = _mtime_ns(self._folder)
        for pub in sorted(self._folder.glob("*.pub")):
            key = serialization.load_pem_public_key(pub.read_bytes())
            if not isinstance(key, Ed25519PublicKey):
                raise ValueError(f"{pub} is not an Ed25519 public key")
            self.add(pub.stem, key, retired_at(self._folder, pub.stem))

    def _entry(self, key_id: str) -> _Entry | None:
        entry = self._keys.get(key_id)
        if self._folder is None:
            return entry
        age = time.monotonic() - self._read_at
        # The mtime: a key rotated in a second ago is trusted now, not after refresh_s (its
        # first messages were refused as unknown_key otherwise); the timers cover folders
        # whose mtime does not move (a network mount) and unknown ids from strangers.
        moved = _mtime_ns(self._folder) != self._read_mtime
        if moved or (entry is None and age >= self._refresh_s) or age >= self._reread_s:
            self.refresh()
            entry = self._keys.get(key_id)
        return entry

    def check_signature(self, msg: Reward | Completion | Trajectory) -> None:
        """Raise Rejected unless `msg` carries a valid signature of a live key of this ring.

        Reasons: unsigned, unknown_key, retired_key, bad_signature.
        """
        key_id, signature, signed = _signed_fields(msg)
        what = type(msg).__name__.lower()
        if not signature:
            raise Rejected("unsigned", f"{what} {msg.id} carries no signature")
        entry = self._entry(key_id)
        if entry is None:
            raise Rejected("unknown_key", f"key id {key_id!r} is not in the keyring")
        if entry.retired_at is not None and msg.created_at > entry.retired_at:
            raise Rejected("retired_key", f"key {key_id!r} was retired before this {what} was signed")
        try:
            entry.key.verify(signature, signed)
        except InvalidSignature:
            raise Rejected("bad_signature", f"{what} {msg.id} does not match its signature") from None


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

    Raises Rejected with reason unsigned, unknown_key, retired_key, bad_signature or replay.
    """
    keyring.check_signature(reward)
    if not await replay.first_time(reward.id):
        raise Rejected("replay", f"reward {reward.id} was already accepted once")


def verify_completion(completion: Completion, engine_keys: Keyring | None) -> None:
    """A completion's engine signature (None: custody off, nothing checked).

    Raises Rejected with reason unsigned, unknown_key, retired_key or bad_signature.
    A replayed signature (copied onto other content, ids or run) fails as bad_signature:
    it covers the completion's id and run. A verbatim copy of a genuine completion is a
    redelivery, which every stage's ledger or buffer already deduplicates.
    """
    if engine_keys is not None:
        engine_keys.check_signature(completion)


def verify_trajectory(trajectory: Trajectory, envhub_keys: Keyring | None) -> None:
    """A trajectory wrapper's env hub signature (None: custody off, nothing checked); the
    wrapped completion's engine signature is `verify_completion`'s.

    Raises Rejected with reason unsigned, unknown_key, retired_key or bad_signature.
    """
    if envhub_keys is not None:
        envhub_keys.check_signature(trajectory)
