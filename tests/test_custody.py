"""Engine signatures on completions (canonical bytes, tamper evidence, keyrings, rotation and
retirement through the key files), the text/token check, and `primerl keys`."""

from __future__ import annotations

import time
from pathlib import Path

import msgspec
import pytest
from transformers import AutoTokenizer

from plumbing.custody import decoded_text
from plumbing.model_store import resolve_model
from plumbing.trust import (
    Keyring,
    Rejected,
    Signer,
    canonical_bytes,
    completion_bytes,
    generate_keypair,
    list_keys,
    newest_live_key,
    retire_key,
    rotate_keys,
    trajectory_bytes,
    verify_completion,
    verify_trajectory,
)
from schemas import Grammar, GrammarKind, Reward, RewardStatus, Trajectory, decode, encode
from tests.reward_helpers import make_completion
from tests.session_helpers import Turn, with_session


@pytest.fixture
def engine_keys(tmp_path: Path) -> tuple[Signer, Keyring]:
    priv, _ = generate_keypair(tmp_path, "engine-a", role="engine")
    return Signer.from_file(priv), Keyring.from_dir(tmp_path)


def test_a_signed_completion_verifies_and_survives_the_wire(engine_keys) -> None:
    signer, ring = engine_keys
    signed = signer.sign(make_completion("<answer>42</answer>", reference="42"))
    assert signed.engine_key_id == "engine-a" and len(signed.engine_signature) == 64
    verify_completion(signed, ring)
    verify_completion(decode(encode(signed), type(signed)), ring)
    assert completion_bytes(signed) == completion_bytes(decode(encode(signed), type(signed)))


def test_an_old_reader_ignores_the_signature_fields() -> None:
    class OldCompletion(msgspec.Struct, kw_only=True, tag_field="kind", tag="Completion"):
        id: str
        text: str

    payload = encode(msgspec.structs.replace(make_completion("t"), engine_signature=b"x" * 64, engine_key_id="k"))
    assert msgspec.msgpack.decode(payload, type=OldCompletion).text == "t"


COVERED = {
    "id": "other/0",
    "run_id": "other",
    "request_id": "other",
    "group_id": "other",
    "group_size": 9,
    "sample_index": 5,
    "policy_version": 7,
    "prompt": "Solve another.",
    "prompt_token_ids": [1, 2, 4],
    "token_ids": [4, 6],
    "logprobs": [-0.5, -0.3],
    "text": "<answer>41</answer>",
    "finish_reason": "length",
    "task": "format",
    "reference": "41",
    "grammar": Grammar(GrammarKind.REGEX, "a+"),
    "worker_id": "engine-other",
    "created_at": 5.0,
    "engine_key_id": "engine-b",
}


@pytest.mark.parametrize("field", sorted(COVERED))
def test_every_covered_field_is_tamper_evident(engine_keys, field: str) -> None:
    signer, ring = engine_keys
    signed = signer.sign(make_completion("<answer>42</answer>", reference="42"))
    with pytest.raises(Rejected) as info:
        verify_completion(msgspec.structs.replace(signed, **{field: COVERED[field]}), ring)
    assert info.value.reason in ("bad_signature", "unknown_key")


def test_unsigned_wrongly_signed_and_transplanted_signatures_are_rejected(engine_keys, tmp_path: Path) -> None:
    signer, ring = engine_keys
    c = make_completion("<answer>42</answer>")
    reasons = {}
    for name, bad in {
        "unsigned": c,
        "stranger": Signer.from_file(generate_keypair(tmp_path / "other", "engine-a")[0]).sign(c),  # same id, other key
        "unknown": Signer.from_file(generate_keypair(tmp_path / "other", "engine-z")[0]).sign(c),
    }.items():
        with pytest.raises(Rejected) as info:
            verify_completion(bad, ring)
        reasons[name] = info.value.reason
    assert reasons == {"unsigned": "unsigned", "stranger": "bad_signature", "unknown": "unknown_key"}
    # A genuine signature replayed onto another completion (other id, other tokens, other run).
    genuine = signer.sign(c)
    for other in (
        msgspec.structs.replace(make_completion("<answer>7</answer>"), id="req-1/1", sample_index=1),
        msgspec.structs.replace(c, run_id="another-run"),
    ):
        replayed = msgspec.structs.replace(
            other, engine_key_id=genuine.engine_key_id, engine_signature=genuine.engine_signature
        )
        with pytest.raises(Rejected) as info:
            verify_completion(replayed, ring)
        assert info.value.reason == "bad_signature"


def test_reward_and_completion_signatures_never_verify_as_each_other(engine_keys) -> None:
    signer, ring = engine_keys
    c = signer.sign(make_completion("x"))
    r = Reward(
        run_id="r",
        completion_id="c",
        request_id="q",
        group_id="g",
        prompt_hash="p",
        tokens_hash="t",
        policy_version=0,
        verifier_id="v",
        verifier_version="1",
        components={},
        scalar=0.0,
        status=RewardStatus.OK,
        key_id="engine-a",
    )
    with pytest.raises(Rejected):  # the engine's signature over a completion, on a reward
        ring.check_signature(msgspec.structs.replace(r, signature=c.engine_signature))
    assert canonical_bytes(r) != completion_bytes(c)


def _trajectory(engine: Signer) -> Trajectory:
    c = engine.sign(with_session(make_completion("<answer>42</answer>"), [Turn([10], [-0.5], 0, [50, 51])]))
    return Trajectory(
        run_id=c.run_id, id=c.id, completion=c, done_reason="env_done", turns=2, components={"calls": 1.0}
    )


def test_a_trajectory_wrapper_is_signed_by_the_env_hub_and_bound_to_its_completion(engine_keys, tmp_path) -> None:
    engine, engine_ring = engine_keys
    priv, _ = generate_keypair(tmp_path / "envhub", "envhub-a", role="envhub")
    hub, ring = Signer.from_file(priv), Keyring.from_dir(tmp_path / "envhub")
    t = hub.sign(_trajectory(engine))
    verify_trajectory(t, ring)
    verify_trajectory(decode(encode(t), Trajectory), ring)
    verify_trajectory(msgspec.structs.replace(t, signature=b""), None)  # custody off: nothing checked
    other = engine.sign(msgspec.structs.replace(t.completion, id="req-0/9"))  # another genuine completion
    for name, forged in {
        "components": msgspec.structs.replace(t, components={"calls": 99.0}),
        "done_reason": msgspec.structs.replace(t, done_reason="turn_limit"),
        "turns": msgspec.structs.replace(t, turns=7),
        "completion": msgspec.structs.replace(t, completion=other),  # the wrapper moved onto another session
    }.items():
        with pytest.raises(Rejected) as info:
            verify_trajectory(forged, ring)
        assert info.value.reason == "bad_signature", name
    with pytest.raises(Rejected) as info:
        verify_trajectory(msgspec.structs.replace(t, signature=b""), ring)
    assert info.value.reason == "unsigned"
    with pytest.raises(Rejected):  # an engine key is no env hub key
        verify_trajectory(engine.sign(_trajectory(engine)), ring)
    with pytest.raises(Rejected):  # nor does a wrapper's signature verify as the completion's
        engine_ring.check_signature(
            msgspec.structs.replace(t.completion, engine_key_id=t.key_id, engine_signature=t.signature)
        )
    assert trajectory_bytes(t) != completion_bytes(t.completion)


def test_rotation_and_retirement_through_the_key_folder(tmp_path: Path) -> None:
    old_priv, _ = generate_keypair(tmp_path, "engine-old", role="engine")
    ring = Keyring.from_dir(tmp_path, refresh_s=0.0)
    old = Signer.from_file(old_priv)
    verify_completion(old.sign(make_completion("a")), ring)
    new_priv, retired = rotate_keys(tmp_path, "engine", grace_s=60.0)
    assert retired == ["engine-old"] and newest_live_key(tmp_path) == new_priv
    new = Signer.from_file(new_priv)
    verify_completion(new.sign(make_completion("b")), ring)  # a key made after the ring was built: re-read
    verify_completion(old.sign(make_completion("c")), ring)  # within the grace: still valid
    late = old.sign(msgspec.structs.replace(make_completion("d"), created_at=time.time() + 120))
    with pytest.raises(Rejected) as info:
        verify_completion(late, ring)
    assert info.value.reason == "retired_key"
    retire_key(tmp_path, new_priv.stem)
    assert newest_live_key(tmp_path) is None
    assert [(k.key_id, k.retired_at is not None) for k in list_keys(tmp_path)] == [
        ("engine-old", True),
        (new_priv.stem, True),
    ]
    fresh = Keyring.from_dir(tmp_path)  # a process started after the retirement
    with pytest.raises(Rejected) as info:
        verify_completion(new.sign(msgspec.structs.replace(make_completion("e"), created_at=time.time() + 1)), fresh)
    assert info.value.reason == "retired_key"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model(None))


def test_the_scored_text_is_the_tokens_decoded(tokenizer) -> None:
    ids = tokenizer.encode("so it is <answer>42</answer>", add_special_tokens=False)
    c = msgspec.structs.replace(make_completion(tokenizer.decode(ids)), token_ids=ids)
    assert decoded_text(c, tokenizer) == c.text
    eos = msgspec.structs.replace(c, token_ids=[*ids, tokenizer.eos_token_id])  # the stop token is not text
    assert decoded_text(eos, tokenizer) == c.text
    # A stop string: vLLM cuts it from the text, not from the tokens; the tokens' text is scored.
    cut = msgspec.structs.replace(c, text=c.text[: c.text.index("</answer>")], finish_reason="stop")
    assert decoded_text(cut, tokenizer) == c.text
    for bad in (
        msgspec.structs.replace(c, text="so it is <answer>41</answer>"),
        msgspec.structs.replace(cut, finish_reason="length"),
    ):
        with pytest.raises(Rejected) as info:
            decoded_text(bad, tokenizer)
        assert info.value.reason == "text_tokens_mismatch"


def test_a_sample_cut_off_inside_a_character_is_not_a_mismatch(tokenizer) -> None:
    """The text vLLM streams (tokenizers' DecodeStream, as its fast incremental detokenizer) for
    a sample cut by max_tokens inside an emoji lacks the partial character; that is accepted, and
    anything more than that partial character still is not."""
    from tokenizers.decoders import DecodeStream

    ids = tokenizer.encode("A rocket \U0001f680 flies", add_special_tokens=False)
    cuts = []
    for n in range(1, len(ids) + 1):
        stream = DecodeStream(skip_special_tokens=True)
        text = "".join(filter(None, (stream.step(tokenizer._tokenizer, i) for i in ids[:n])))
        c = msgspec.structs.replace(make_completion(text), token_ids=ids[:n], finish_reason="length")
        assert decoded_text(c, tokenizer).startswith(text)
        if text != tokenizer.decode(ids[:n], skip_special_tokens=True):
            cuts.append(c)
    assert cuts, "no cut fell inside the emoji: the test no longer covers the held-back tail"
    for c in cuts:  # a word dropped before the partial character is still refused
        with pytest.raises(Rejected):
            decoded_text(msgspec.structs.replace(c, text=c.text[: -len(" rocket")]), tokenizer)


def test_keys_cli_generates_lists_rotates_and_retires_every_role(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from primerl.cli import app

    cli = CliRunner()
    state = ["--state-dir", str(tmp_path)]
    for role, folder in (
        ("engine", tmp_path / "keys" / "engine"),
        ("envhub", tmp_path / "keys" / "envhub"),
        ("verifier", tmp_path / "keys"),
    ):
        out = cli.invoke(app, ["keys", "generate", "--role", role, "--key-id", f"{role}-one", *state])
        assert out.exit_code == 0, out.output
        out = cli.invoke(app, ["keys", "rotate", "--role", role, "--grace-s", "0", *state])
        assert out.exit_code == 0 and f"{role}-one" in out.output
        new = newest_live_key(folder)
        assert new is not None and new.stem != f"{role}-one"
        listed = cli.invoke(app, ["keys", "list", "--role", role, *state]).output
        assert f"{role}-one" in listed and "retired from" in listed and "(signs)" in listed
        assert cli.invoke(app, ["keys", "retire", new.stem, "--role", role, *state]).exit_code == 0
        assert newest_live_key(folder) is None
        assert cli.invoke(app, ["keys", "retire", "nope", "--role", role, *state]).exit_code == 1
    assert cli.invoke(app, ["keys", "list", "--role", "other", *state]).exit_code != 0
