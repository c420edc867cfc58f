"""The env hub's tools: the safe calculator, python through the real sandbox, the browser against the corpus."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import msgspec
import pytest
from aiohttp import web

from envhub.connectors.browser import Browser, readable_text
from envhub.connectors.calculator import CalcError, Calculator, evaluate
from envhub.connectors.python import PythonTool
from envhub.corpus import ISLANDS
from envhub.corpus_server import corpus_server
from envhub.protocol import EnvContext
from plumbing.sandbox import Sandbox, SandboxLimits

# --- calculator ---


@pytest.mark.parametrize(
    "expr,value",
    [
        ("123 * 45", "5535"),
        ("(1 + 2) * -3", "-9"),
        ("7 // 2 + 7 % 2", "4"),
        ("10 / 4", "2.5"),
        ("10 / 2", "5"),
        ("2 ** 10", "1024"),
        ("2 ^ 3", "8"),  # what a model writes for a power
        ("12 × 3", "36"),
        ("1e3 + 0.5", "1000.5"),
    ],
)
def test_calculator_arithmetic(expr: str, value: str) -> None:
    assert evaluate(expr) == value


@pytest.mark.parametrize(
    "expr,why",
    [
        ("__import__('os').system('id')", "Call"),
        ("().__class__.__bases__", "Attribute"),
        ("x + 1", "Name"),
        ("[1, 2][0]", "Subscript"),
        ("lambda: 1", "Lambda"),
        ("9 ** 9 ** 9", "exponent"),
        ("2 ** 5000", "exponent"),
        ("7 ** 900", "too large"),
        ("10.0 ** 400", "too large"),
        ("1 / 0", "division by zero"),
        ("(-8) ** 0.5", "not a real number"),
        ("True + 1", "unsupported constant"),
        ("1 +", "not an arithmetic expression"),
        ("1" * 600, "longer than"),
        ("1 & 3", "unsupported operator"),
    ],
)
def test_calculator_refuses(expr: str, why: str) -> None:
    with pytest.raises(CalcError, match=why):
        evaluate(expr)


async def test_calculator_tool_traces() -> None:
    good = await Calculator().call("6 * 7", turn_index=2)
    assert good.text == "42" and good.trace.ok and good.trace.tool == "calculator" and good.trace.turn_index == 2
    bad = await Calculator().call("import os", turn_index=3)
    assert bad.text.startswith("error: ") and not bad.trace.ok and bad.trace.error


async def test_calculator_huge_power_is_quick() -> None:
    started = time.monotonic()
    out = await Calculator().call("99999 ** 999", 0)
    assert not out.trace.ok and "too large" in out.text and time.monotonic() - started < 0.5


# --- python, through the real sandbox ---

FAST = SandboxLimits(cpu_s=2, wall_s=4.0, memory_bytes=256 * 1024 * 1024)


async def test_python_tool_returns_stdout() -> None:
    out = await PythonTool(Sandbox(FAST)).call("print(sum(i * i for i in range(10)))", 1)
    assert out.text == "285" and out.trace.ok and out.trace.tool == "python" and out.trace.bytes > 0


async def test_python_tool_errors_are_observations() -> None:
    tool = PythonTool(Sandbox(FAST))
    crash = await tool.call("print('before')\n1 / 0", 0)
    assert not crash.trace.ok and "ZeroDivisionError" in crash.trace.error
    assert crash.text.startswith("before\nerror: failed: ZeroDivisionError")
    blocked = await tool.call("import socket\nsocket.socket()", 0)
    assert not blocked.trace.ok and blocked.trace.error.startswith("blocked")
    syntax = await tool.call("x = 1\nprint(x +)", 0)
    assert not syntax.trace.ok and "SyntaxError" in syntax.trace.error and "line 2" in syntax.trace.error
    silent = await tool.call("x = 1", 0)
    assert silent.trace.ok and "no output" in silent.text


async def test_python_tool_wall_clock() -> None:
    tool = PythonTool(Sandbox(msgspec.structs.replace(FAST, wall_s=1.0)))
    out = await tool.call("import time\ntime.sleep(30)", 0)
    assert not out.trace.ok and out.trace.error.startswith("timeout") and out.trace.latency_ms < 10_000


async def test_python_tool_caps_output() -> None:
    out = await PythonTool(Sandbox(FAST)).call("print('x' * 20000)", 0)
    assert out.trace.ok and "[output cut at 4000 characters]" in out.text and len(out.text) < 4100


# --- browser, against the real corpus server ---


@pytest.fixture
async def corpus() -> AsyncIterator[str]:
    async with corpus_server(port=0) as url:
        yield url


@pytest.fixture
async def browser(corpus: str) -> AsyncIterator[Browser]:
    b = Browser(EnvContext(corpus_url=corpus, http_timeout_s=2.0))
    yield b
    await b.aclose()


def test_readable_text_drops_chrome() -> None:
    html = (
        "<html><head><title>T</title><script>var secret = 1;</script><style>p {}</style></head><body>"
        "<nav>menu items</nav><h1>Head</h1><p>First <b>bold</b> para.</p><ul><li><a href='/wiki/A'>A</a></li></ul>"
        "<footer>foot</footer></body></html>"
    )
    text = readable_text(html)
    assert text.splitlines() == ["T", "Head", "First bold para.", "- A [/wiki/A]"]


async def test_fetch_a_page(browser: Browser, corpus: str) -> None:
    island = ISLANDS[7]
    out = await browser.call(f"/wiki/{island.name}", turn_index=1)
    assert out.trace.ok and out.trace.status == 200 and out.trace.bytes > 500 and out.trace.latency_ms > 0
    assert out.trace.url == f"{corpus}/wiki/{island.name}" and out.trace.tool == "browser"
    assert f"Its capital is {island.capital}." in out.text and str(island.founded) in out.text
    assert "tracker" not in out.text and "Main page" not in out.text  # script and nav dropped
    absolute = await browser.call(f"{corpus}/wiki/{island.name}", 1)
    assert absolute.text == out.text


async def test_words_are_a_search(browser: Browser) -> None:
    island = ISLANDS[12]
    out = await browser.call(f"capital of {island.name}", 0)
    assert out.trace.ok and "/search?q=capital%20of%20" in out.trace.url
    assert out.text.splitlines()[2] == f"- {island.name} [/wiki/{island.name}]"  # title, heading, best hit


async def test_unknown_page_is_a_failed_fetch(browser: Browser) -> None:
    out = await browser.call("/wiki/Atlantis", 0)
    assert not out.trace.ok and out.trace.status == 404 and out.trace.error == "HTTP 404"
    assert out.text.startswith("error: HTTP 404") and "search" in out.text


@pytest.mark.parametrize(
    "url,why",
    [
        ("http://example.com/", "not on the allow-list"),
        ("https://169.254.169.254/latest/meta-data", "not on the allow-list"),
        ("file:///etc/passwd", "scheme 'file' refused"),
        ("ftp://127.0.0.1/x", "scheme 'ftp' refused"),
        ("http://[::1", "invalid URL"),
    ],
)
async def test_off_list_urls_are_refused(browser: Browser, url: str, why: str) -> None:
    out = await browser.call(url, 0)
    assert not out.trace.ok and why in out.trace.error and out.text.startswith("error: ") and out.trace.status == 0


async def test_another_port_on_the_same_host_is_refused(browser: Browser, corpus: str) -> None:
    async with corpus_server(port=0) as other:
        assert other != corpus
        out = await browser.call(f"{other}/wiki/{ISLANDS[0].name}", 0)
    assert not out.trace.ok and "allow-list" in out.trace.error


async def test_timeout_and_byte_cap() -> None:
    async def slow(_: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(text="late")

    async def big(_: web.Request) -> web.Response:
        return web.Response(text="<p>" + "word " * 50_000 + "</p>", content_type="text/html")

    async def away(_: web.Request) -> web.Response:
        raise web.HTTPFound("http://example.com/")  # a redirect off the allow-list is not followed

    app = web.Application()
    app.add_routes([web.get("/slow", slow), web.get("/big", big), web.get("/away", away)])
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    browser = Browser(EnvContext(corpus_url=url, http_timeout_s=0.5), max_bytes=10_000)
    try:
        started = time.monotonic()
        late = await browser.call("/slow", 0)
        assert not late.trace.ok and late.trace.error == "timeout" and "timed out" in late.text
        assert time.monotonic() - started < 3
        moved = await browser.call("/away", 0)
        assert not moved.trace.ok and moved.trace.status == 302 and moved.trace.url == f"{url}/away"
        cut = await browser.call("/big", 0)
        assert cut.trace.ok and cut.trace.bytes == 10_000 and cut.text.endswith("[page cut at 10000 bytes]")
    finally:
        await browser.aclose()
        await runner.cleanup()


async def test_unreachable_host_is_an_observation() -> None:
    async with corpus_server(port=0) as url:
        pass  # stopped: its port refuses connections now
    browser = Browser(EnvContext(corpus_url=url, http_timeout_s=2.0))
    try:
        out = await browser.call("/wiki/X", 0)
    finally:
        await browser.aclose()
    assert not out.trace.ok and "ClientConnectorError" in out.trace.error and out.text.startswith("error: fetch failed")
