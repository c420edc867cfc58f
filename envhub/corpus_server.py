"""The local corpus server: the retrieval environment's web, served on localhost.

Routes: `/wiki/<Name>` (an island's page, 404 for unknown names), `/search?q=` (links
to the best-matching pages), `/healthz`, `/metrics` (Prometheus: requests by route and
status). In process: `async with corpus_server(port=0) as url:` (port 0: a free one).
As a process: `python -m envhub.corpus_server --port 8089` prints its URL; SIGTERM or
SIGINT stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from envhub import corpus

_HTML = "text/html"
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def make_app() -> web.Application:
    """The corpus app; each app has its own metrics registry (several servers may share a process)."""
    registry = CollectorRegistry()
    requests = Counter(
        "primerl_corpus_requests", "Corpus server requests by route and status", ["route", "status"], registry=registry
    )

    @web.middleware
    async def count(request: web.Request, handler: _Handler) -> web.StreamResponse:
        route = request.path.split("/")[1] if request.path.count("/") > 1 else request.path.lstrip("/")
        route = route if route in ("wiki", "search", "healthz", "metrics") else "other"
        try:
            resp = await handler(request)
        except web.HTTPException as exc:
            requests.labels(route, str(exc.status)).inc()
            raise
        requests.labels(route, str(resp.status)).inc()
        return resp

    async def wiki(request: web.Request) -> web.Response:
        html = corpus.page(request.match_info["name"])
        if html is None:
            return web.Response(status=404, text="<html><body><p>No such page.</p></body></html>", content_type=_HTML)
        return web.Response(text=html, content_type=_HTML)

    async def search(request: web.Request) -> web.Response:
        return web.Response(text=corpus.search_page(request.query.get("q", "")), content_type=_HTML)

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def metrics(_: web.Request) -> web.Response:
        resp = web.Response(body=generate_latest(registry))
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    app = web.Application(middlewares=[count])
    app.add_routes(
        [
            web.get("/wiki/{name}", wiki),
            web.get("/search", search),
            web.get("/healthz", healthz),
            web.get("/metrics", metrics),
        ]
    )
    return app


@asynccontextmanager
async def corpus_server(host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Serve the corpus while the block runs; yields its base URL (http://host:port)."""
    runner = web.AppRunner(make_app(), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0]
        yield f"http://{host}:{bound[1]}"
    finally:
        await runner.cleanup()


async def _serve(host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with corpus_server(host, port) as url:
        print(url, flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the fictional island corpus for the retrieval environment.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089, help="0: a free port (the printed URL says which)")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.host, args.port))


if __name__ == "__main__":
    main()
