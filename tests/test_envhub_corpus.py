"""The fictional corpus and its server: pages, search, 404, health, metrics, and the process with SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp

from envhub import corpus
from envhub.corpus_server import corpus_server

ROOT = Path(__file__).resolve().parents[1]


def test_the_corpus_is_deterministic_and_unique() -> None:
    assert len(corpus.ISLANDS) == 40 and len(corpus.BY_NAME) == 40
    assert corpus._islands() == corpus.ISLANDS  # the same islands in every process
    assert len({i.capital for i in corpus.ISLANDS}) == 40 and len({i.peak for i in corpus.ISLANDS}) == 40
    assert not {i.capital for i in corpus.ISLANDS} & set(corpus.BY_NAME)
    assert all(i.neighbor in corpus.BY_NAME and i.neighbor != i.name for i in corpus.ISLANDS)
    assert "Examplia" not in corpus.BY_NAME  # the prompts' worked example must not be a real page


def test_search_ranks_the_named_island_first() -> None:
    for island in corpus.ISLANDS[:10]:
        assert corpus.search(f"what is the capital of {island.name}")[0] == island.name
    assert corpus.search("") == [] and corpus.search("!!") == []
    assert len(corpus.search("island sea mount")) <= 5


async def test_server_routes() -> None:
    island = corpus.ISLANDS[3]
    async with corpus_server(port=0) as url, aiohttp.ClientSession() as http:
        async with http.get(f"{url}/wiki/{island.name}") as r:
            assert r.status == 200 and r.content_type == "text/html"
            assert f"Its capital is {island.capital}." in await r.text()
        async with http.get(f"{url}/wiki/Atlantis") as r:
            assert r.status == 404
        async with http.get(f"{url}/search", params={"q": island.name}) as r:
            assert r.status == 200 and f'href="/wiki/{island.name}"' in await r.text()
        async with http.get(f"{url}/nowhere") as r:
            assert r.status == 404
        async with http.get(f"{url}/healthz") as r:
            assert r.status == 200 and await r.text() == "ok"
        async with http.get(f"{url}/metrics") as r:
            metrics = await r.text()
    assert 'primerl_corpus_requests_total{route="wiki",status="200"} 1.0' in metrics
    assert 'primerl_corpus_requests_total{route="wiki",status="404"} 1.0' in metrics
    assert 'primerl_corpus_requests_total{route="other",status="404"} 1.0' in metrics
    assert 'primerl_corpus_requests_total{route="search",status="200"} 1.0' in metrics


async def test_server_process_prints_its_url_and_stops_on_sigterm() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "envhub.corpus_server", "--port", "0", stdout=asyncio.subprocess.PIPE, env=env
    )
    try:
        assert proc.stdout is not None
        url = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":0")
        async with aiohttp.ClientSession() as http, http.get(f"{url}/healthz") as r:
            assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
