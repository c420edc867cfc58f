"""Which keys a process signs with and trusts, from its Config (plumbing/trust.py does the crypto).

Key distribution is by files under the state dir: verifier keys in `<state_dir>/keys`,
engine keys in `<state_dir>/keys/engine`, env hub keys in `<state_dir>/keys/envhub`.
Every process of a run shares that folder (one host, or a shared volume in deploy/), so
a public key reaches its checkers by being written next to the private one; no network
path, no Redis key an attacker with Redis access could add a key to. Checkers re-read
the folder when they meet a key id they do not know, so a rotation needs no restart.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from plumbing.config import Config
from plumbing.trust import Keyring, Rejected, Signer, load_or_create_signer
from schemas import Completion

log = logging.getLogger(__name__)


def engine_signer(cfg: Config) -> Signer:
    """The engine's key: `engine.key_file`, else the newest live key under keys/engine (made on first use)."""
    if cfg.engine.key_file is not None:
        return Signer.from_file(cfg.engine.key_file)
    signer, generated = load_or_create_signer(cfg.engine_keys_dir, "engine")
    if generated:
        log.info(
            "generated engine key %s in %s (verifiers and learners trust that folder)",
            signer.key_id,
            cfg.engine_keys_dir,
        )
    return signer


def verifier_signer(cfg: Config) -> Signer:
    """The verifier's key: `verifier.key_file`, else the newest live key under keys (made on first use)."""
    if cfg.verifier.key_file is not None:
        return Signer.from_file(cfg.verifier.key_file)
    signer, generated = load_or_create_signer(cfg.keys_dir, "verifier")
    if generated:
        log.info("generated verifier key %s in %s (learners trust that folder)", signer.key_id, cfg.keys_dir)
    return signer


def envhub_signer(cfg: Config) -> Signer:
    """The env hub's key: the newest live key under keys/envhub (made on first use)."""
    signer, generated = load_or_create_signer(cfg.envhub_keys_dir, "envhub")
    if generated:
        log.info("generated env hub key %s in %s (verifiers trust that folder)", signer.key_id, cfg.envhub_keys_dir)
    return signer


def envhub_keyring(cfg: Config) -> Keyring | None:
    """The env hub keys verifiers trust for trajectories; None when custody.require_engine_signatures is off."""
    if not cfg.custody.require_engine_signatures:
        return None
    return Keyring.from_dir(cfg.envhub_keys_dir)


def engine_keyring(cfg: Config) -> Keyring | None:
    """The engine keys verifiers and learners trust; None when custody.require_engine_signatures is off."""
    if not cfg.custody.require_engine_signatures:
        return None
    return Keyring.from_dir(cfg.engine_keys_dir)


def verifier_keyring(cfg: Config) -> Keyring:
    """The verifier keys learners trust."""
    return Keyring.from_dir(cfg.keys_dir)


def engine_tokenizer(cfg: Config) -> Any:
    """The engine's tokenizer for the text/token check; None when custody.check_text_tokens is off."""
    if not cfg.custody.check_text_tokens:
        return None
    from transformers import AutoTokenizer

    from plumbing.model_store import resolve_model

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(resolve_model(cfg.custody.tokenizer or cfg.engine.model))
    log.info("loaded the engine's tokenizer for the text/token check in %.2fs", time.perf_counter() - t0)
    return tok


def _incomplete_char_tail(tail: str) -> bool:
    """A tail the engine's incremental detokenizer holds back: the bytes of a character the
    sample was cut off in (decoded here as U+FFFD), with the space before it. vLLM's
    DecodeStream emits nothing until a character is whole, so a sample cut by max_tokens
    mid-emoji ends without it; one in ~180 bench completions at 2,048 tokens did."""
    return "\ufffd" in tail and not tail.replace("\ufffd", "").strip()


def decoded_text(c: Completion, tokenizer: Any) -> str:
    """The text a learner trains on: `c.token_ids` decoded as the engine's detokenizer does.

    Raises Rejected("text_tokens_mismatch") unless `c.text` is that decoding, or a prefix of
    it ending where a stop string was cut off (finish reason `stop`: vLLM drops the stop
    string from the text, not from the tokens), or short of an incomplete last character
    (`_incomplete_char_tail`). What is returned is scored.
    """
    full = tokenizer.decode(c.token_ids, skip_special_tokens=True)
    if full == c.text or (c.finish_reason == "stop" and full.startswith(c.text)):
        return str(full)
    if full.startswith(c.text) and _incomplete_char_tail(full[len(c.text) :]):
        return str(full)
    at = next((i for i, (a, b) in enumerate(zip(full, c.text, strict=False)) if a != b), min(len(full), len(c.text)))
    raise Rejected(
        "text_tokens_mismatch",
        f"completion {c.id}: its text is not its token_ids decoded (first difference at character {at}: "
        f"text {c.text[at : at + 20]!r}, tokens {full[at : at + 20]!r})",
    )
