"""The config's credentials and TLS settings as client keyword arguments (Kafka, Redis).

Every Kafka client of the project gets `kafka_security_kwargs` through
plumbing/kafka.py's `common_kwargs`; every Redis client gets `redis_kwargs` (through
plumbing/redis_client.py or directly). One mapping, so no client connects without the
credentials the others use.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from aiokafka.helpers import create_ssl_context
from pydantic import BaseModel, SecretStr

from plumbing.config import Config, KafkaConfig


def _path(p: Path | None) -> str | None:
    return None if p is None else str(p)


def kafka_ssl_context(k: KafkaConfig) -> ssl.SSLContext:
    """The TLS context of an SSL / SASL_SSL connection (system CAs unless tls_ca_file)."""
    ctx = create_ssl_context(
        cafile=_path(k.tls_ca_file),
        certfile=_path(k.tls_cert_file),
        keyfile=_path(k.tls_key_file),
        password=k.tls_key_password.get_secret_value() if k.tls_key_password else None,
    )
    ctx.check_hostname = k.tls_check_hostname
    return ctx


def kafka_security_kwargs(k: KafkaConfig) -> dict[str, object]:
    """aiokafka's security_protocol / sasl_* / ssl_context for `k` (config validation made them consistent)."""
    out: dict[str, object] = {"security_protocol": k.security_protocol}
    if k.security_protocol.startswith("SASL_"):
        assert k.sasl_password is not None  # the config's validator requires it
        out |= {
            "sasl_mechanism": k.sasl_mechanism,
            "sasl_plain_username": k.sasl_username,
            "sasl_plain_password": k.sasl_password.get_secret_value(),
        }
    if k.security_protocol.endswith("SSL"):
        out["ssl_context"] = kafka_ssl_context(k)
    return out


def redis_kwargs(cfg: Config, url: str | None = None) -> dict[str, Any]:
    """redis-py `from_url` keyword arguments for `url` (default: cfg.redis_url): ACL user and TLS.

    TLS settings need a `rediss://` URL: on a `redis://` one redis-py would drop them
    and talk in the clear, so that is refused here.
    """
    r = cfg.redis
    scheme = urlsplit(url if url is not None else cfg.redis_url).scheme
    out: dict[str, Any] = {}
    if r.password is not None:
        parts = urlsplit(url if url is not None else cfg.redis_url)
        if parts.username or parts.password:
            # redis-py lets the URL's user win silently; two sources of one secret is a mistake.
            raise ValueError("Redis credentials are both in redis_url and in redis.username/password: keep one")
        out["password"] = r.password.get_secret_value()
        if r.username is not None:
            out["username"] = r.username
    tls = r.tls_ca_file or r.tls_cert_file or r.tls_key_file
    if scheme == "rediss":
        out |= {
            "ssl_cert_reqs": "required",
            "ssl_check_hostname": r.tls_check_hostname,
            "ssl_ca_certs": _path(r.tls_ca_file),
            "ssl_certfile": _path(r.tls_cert_file),
            "ssl_keyfile": _path(r.tls_key_file),
        }
    elif tls:
        raise ValueError(f"redis.tls_* is set but redis_url is {scheme}://: use rediss:// for TLS")
    return out


def redacted(url: str) -> str:
    """`url` with any password replaced by `***` (for logs and status lines)."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _env_value(value: object) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    return str(value).lower() if isinstance(value, bool) else str(value)


def server_env(cfg: Config) -> dict[str, str]:
    """The environment that points a child `primerl` process at `cfg`'s servers with `cfg`'s
    credentials and TLS settings (a child may not share the parent's --config or --state-dir)."""
    env = {"KAFKA_BOOTSTRAP_SERVERS": cfg.bootstrap, "REDIS_URL": cfg.redis_url}
    sections: tuple[tuple[str, BaseModel, tuple[str, ...]], ...] = (
        ("PRIMERL_KAFKA__", cfg.kafka, ("security_", "sasl_", "tls_")),
        ("PRIMERL_REDIS__", cfg.redis, ("username", "password", "tls_")),
    )
    for prefix, section, wanted in sections:
        for name in type(section).model_fields:
            value = getattr(section, name)
            if name.startswith(wanted) and value is not None and value != type(section).model_fields[name].default:
                env[prefix + name.upper()] = _env_value(value)
    return env
