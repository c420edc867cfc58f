"""The local corpus: 40 fictional islands, generated deterministically, as small wiki pages.

Fictional on purpose: a model cannot know an island's capital or founding year from
pretraining, so a right answer in the retrieval environment means it read the page.
The same seed always gives the same islands (names are unique), so questions and
their reference answers made in one process hold in any other.
"""

from __future__ import annotations

import html
import random
import re

import msgspec

SEED = 23
N_ISLANDS = 40
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "th", "sh", "vel")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ou", "ia")
_CODAS = ("", "", "n", "r", "s", "th", "l", "m", "sk", "nd")
_LANGUAGES = ("Orlish", "Maravic", "Tellune", "Quessan", "Brimic", "Ostari", "Velunese", "Kharic")
_EXPORTS = ("salt", "amber", "kelp", "copper", "pearls", "wool", "timber", "saffron", "tin", "glass")


class Island(msgspec.Struct, frozen=True, kw_only=True):
    """One page's facts; `name` is also the page's path (/wiki/<name>)."""

    name: str
    capital: str
    founded: int
    population: int
    peak: str
    peak_m: int
    language: str
    export: str
    neighbor: str = ""


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)).title()


def _islands() -> list[Island]:
    rng = random.Random(SEED)
    used: set[str] = set()

    def fresh(syllables: int) -> str:
        while True:
            word = _word(rng, syllables)
            if word not in used and len(word) <= 14:
                used.add(word)
                return word

    names = [fresh(rng.choice((2, 3))) for _ in range(N_ISLANDS)]
    out = []
    for i, name in enumerate(names):
        out.append(
            Island(
                name=name,
                capital=fresh(2),
                founded=rng.randint(1204, 1899),
                population=rng.randint(1_200, 480_000),
                peak="Mount " + fresh(2),
                peak_m=rng.randint(180, 2950),
                language=rng.choice(_LANGUAGES),
                export=rng.choice(_EXPORTS),
                neighbor=names[(i + 1 + rng.randrange(N_ISLANDS - 1)) % N_ISLANDS],
            )
        )
    return out


ISLANDS: list[Island] = _islands()
BY_NAME: dict[str, Island] = {i.name: i for i in ISLANDS}

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{name} - Island Wiki</title>
<style>body {{ font-family: serif; }}</style><script>var tracker = "ignore me";</script></head>
<body><nav><a href="/wiki/Main">Main page</a> | <a href="/search?q=">Search</a> | Random island</nav>
<h1>{name}</h1>
<p>{name} is an island in the Saltwind Sea. Its capital is {capital}. The island was founded in {founded}
and has a population of {population}.</p>
<p>The highest point of {name} is {peak}, at {peak_m} metres. Most islanders speak {language};
the island's main export is {export}.</p>
<p>Its nearest neighbour is <a href="/wiki/{neighbor}">{neighbor}</a>.</p>
<footer>Island Wiki is a fictional corpus for the PrimeRL retrieval environment.</footer>
</body></html>
"""


def page(name: str) -> str | None:
    """The HTML page of island `name`, or None when there is none."""
    island = BY_NAME.get(name)
    if island is None:
        return None
    fields = {k: html.escape(str(v)) for k, v in msgspec.structs.asdict(island).items()}
    return _PAGE.format(**fields)


_STOPWORDS = frozenset("a an and the of in on is was what which who when where how many much year".split())


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.casefold())) - _STOPWORDS


def search(query: str, limit: int = 5) -> list[str]:
    """Island names best matching `query`: whole words of the query in a page's facts, its name counting most."""
    words = _words(query)
    if not words:
        return []
    scored = []
    for island in ISLANDS:
        facts = _words(" ".join(str(v) for v in msgspec.structs.astuple(island)))
        hits = len(words & facts) + 10 * (island.name.casefold() in words)
        if hits:
            scored.append((-hits, island.name))
    return [name for _, name in sorted(scored)[:limit]]


def search_page(query: str) -> str:
    """The HTML results page of a search: links to the best-matching pages."""
    names = search(query)
    items = "".join(f'<li><a href="/wiki/{n}">{n}</a></li>' for n in names) or "<li>No results.</li>"
    q = html.escape(query)
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>Search: {q} - Island Wiki</title></head>'
        f"<body><h1>Search results for {q}</h1><ul>{items}</ul></body></html>"
    )
