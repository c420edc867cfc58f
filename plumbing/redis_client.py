"""The Redis connection of a process."""

from __future__ import annotations

from redis.asyncio import Redis

from plumbing.config import Config


def connect_redis(cfg: Config) -> Redis:
    """An asyncio Redis client for `cfg.redis_url` (connects lazily)."""
    if not cfg.redis_url:
        raise RuntimeError("no Redis configured: set REDIS_URL or run `primerl infra up`")
    return Redis.from_url(cfg.redis_url, socket_timeout=5, socket_connect_timeout=1)
