"""The Redis connection of a process."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from plumbing.config import Config
from plumbing.security import redis_kwargs


def connect_redis(cfg: Config, url: str | None = None, **options: Any) -> Redis:
    """An asyncio Redis client for `url` (default: cfg.redis_url) with the config's ACL user and TLS
    (connects lazily). `options` override the 5 s / 1 s socket timeouts and add redis-py settings."""
    url = url if url is not None else cfg.redis_url
    if not url:
        raise RuntimeError("no Redis configured: set REDIS_URL or run `primerl infra up`")
    settings: dict[str, Any] = {"socket_timeout": 5, "socket_connect_timeout": 1, **options}
    return Redis.from_url(url, **redis_kwargs(cfg, url), **settings)
