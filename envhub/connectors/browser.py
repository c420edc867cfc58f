"""The `browser` tool: fetch a page over HTTP and give the model its readable text.

A model must not reach arbitrary hosts from a training cluster: only http(s) URLs on
an allow-list (by default the corpus server's host and port) are fetched, redirects
are not followed (one could leave the list), and a page is read up to a byte cap.
Relative URLs (`/wiki/Name`) resolve against the corpus; bare words are a search.
"""

from __future__ import annotations

import time
from urllib.parse import quote, urljoin, urlsplit

import aiohttp
from bs4 import BeautifulSoup

from envhub.connectors import ToolOutput
from envhub.protocol import EnvContext
from schemas.sessions import ToolTrace

MAX_PAGE_BYTES = 256 * 1024
# Structure and chrome, not content: their text would crowd out the page's facts.
_DROP = ("script", "style", "nav", "header", "footer", "aside", "noscript", "form")
_KEEP = ("h1", "h2", "h3", "p", "li")


def _netloc(url: str) -> str:
    """host:port of `url`, lower case, the port made explicit (so :80 and no port compare equal)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{(parts.hostname or '').lower()}:{port}"


def readable_text(html: str) -> str:
    """Title, headings, paragraphs and list items of `html`, links as `text [href]` (how a model follows one)."""
    soup = BeautifulSoup(html, "html.parser")
    for tag in soup.find_all(_DROP):
        tag.decompose()
    for a in soup.find_all("a", href=True):
        a.replace_with(f"{a.get_text(' ', strip=True)} [{a['href']}]")
    lines = []
    if soup.title and soup.title.get_text(strip=True):
        lines.append(soup.title.get_text(" ", strip=True))
    for tag in soup.find_all(_KEEP):
        if tag.find_parent(_KEEP) is not None:
            continue  # a <p> inside an <li>: its text is in the parent's already
        text = " ".join(tag.get_text(" ", strip=True).split())
        if text:
            lines.append(f"- {text}" if tag.name == "li" else text)
    return "\n".join(lines)


class Browser:
    """The `browser` tool; one aiohttp session per connector, closed by `aclose`."""

    name = "browser"

    def __init__(self, ctx: EnvContext, allow: tuple[str, ...] | None = None, max_bytes: int = MAX_PAGE_BYTES) -> None:
        self.base = ctx.corpus_url.rstrip("/") + "/"
        self.timeout_s = ctx.http_timeout_s
        self.max_bytes = max_bytes
        # Allowed hosts as host:port; None: the corpus server's only.
        self.allow = frozenset(_netloc(u if "//" in u else f"http://{u}") for u in (allow or (ctx.corpus_url,)))
        self._session: aiohttp.ClientSession | None = None

    def resolve(self, args: str) -> str:
        """The URL to fetch: a URL as given (`/path` against the corpus), words a corpus search."""
        target = args.strip()
        if not any(c.isspace() for c in target) and (target.startswith(("/", "./", "../")) or urlsplit(target).scheme):
            return urljoin(self.base, target)
        return urljoin(self.base, "search?q=" + quote(target))

    def _refusal(self, url: str) -> str:
        """Why `url` may not be fetched, or ''."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            return f"scheme {parts.scheme or '(none)'!r} refused: only http and https"
        where = _netloc(url)  # ValueError for a port that is not a number
        if where not in self.allow:
            return f"host {where} is not on the allow-list"
        return ""

    async def _read(self, resp: aiohttp.ClientResponse) -> tuple[bytes, bool]:
        body = bytearray()
        while len(body) <= self.max_bytes and (chunk := await resp.content.read(65536)):
            body += chunk
        return bytes(body[: self.max_bytes]), len(body) > self.max_bytes

    async def call(self, args: str, turn_index: int) -> ToolOutput:
        """Fetch the page `args` names; every failure is an output with ok=False and its reason."""
        started = time.monotonic()
        try:
            url = self.resolve(args)
            refusal = self._refusal(url)
        except ValueError as err:  # urlsplit on e.g. an unclosed IPv6 bracket
            url, refusal = args.strip(), f"invalid URL: {err}"

        def out(text: str, ok: bool, error: str = "", status: int = 0, size: int = 0) -> ToolOutput:
            trace = ToolTrace(
                turn_index=turn_index,
                tool=self.name,
                ok=ok,
                error=error,
                latency_ms=(time.monotonic() - started) * 1000,
                url=url[:500],
                status=status,
                bytes=size,
            )
            return ToolOutput(text, trace)

        if refusal:
            return out(f"error: {refusal}", False, refusal)
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            async with self._session.get(
                url, timeout=aiohttp.ClientTimeout(total=self.timeout_s), allow_redirects=False
            ) as resp:
                body, cut = await self._read(resp)
                status, ctype = resp.status, resp.content_type
                charset = resp.charset or "utf-8"
        except TimeoutError:
            return out(f"error: timed out after {self.timeout_s:g} s", False, "timeout")
        except aiohttp.ClientError as err:
            return out(f"error: fetch failed: {type(err).__name__}", False, f"{type(err).__name__}: {err}"[:300])
        size = len(body)
        if status != 200:
            error = f"HTTP {status}"
            hint = " (no such page: try a search)" if status == 404 else ""
            return out(f"error: {error} for {url}{hint}", False, error, status, size)
        try:
            html = body.decode(charset, "replace")
        except LookupError:  # an unknown charset name
            html = body.decode("utf-8", "replace")
        try:
            text = readable_text(html) if "html" in ctype else html
        except Exception as err:  # noqa: BLE001 - a page the parser chokes on is the page's problem
            return out(f"error: unreadable page: {type(err).__name__}", False, f"parse: {err}"[:300], status, size)
        if cut:
            text += f"\n[page cut at {self.max_bytes} bytes]"
        return out(text or "(the page has no readable text)", True, "", status, size)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
