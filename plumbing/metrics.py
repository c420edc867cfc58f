"""Serving a process's Prometheus registry on `/metrics`."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, start_http_server

from plumbing.config import MetricsConfig

log = logging.getLogger(__name__)


def serve_metrics(cfg: MetricsConfig, registry: CollectorRegistry) -> int:
    """Start the `/metrics` HTTP server in a daemon thread; returns the bound port."""
    server, _thread = start_http_server(cfg.port, addr=cfg.host, registry=registry)
    port = int(server.server_port)
    log.info("metrics on http://%s:%d/metrics", cfg.host, port)
    return port
