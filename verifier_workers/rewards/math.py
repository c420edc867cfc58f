"""The math reward: extract the final answer, compare it numerically, then symbolically.

Extraction order: the last balanced `\\boxed{...}` (nested braces allowed), else the
last `<answer>...</answer>`, else the last number in the text. The `format`
component is 1.0 when the answer came from a box or tags.

Comparison: normalized strings, then exact fractions within a relative tolerance
(ints, decimals, `3/4`, `\\frac{3}{4}`), then sympy. sympy's parser evaluates the text
it is given, so an answer reaches it only after a whitelist of characters and names,
a length limit and a limit on powers (a tower such as `9**9**9` would hold the GIL
for minutes); the comparison itself runs in a thread under a deadline.
"""

from __future__ import annotations

import asyncio
import re
from fractions import Fraction

import sympy
from sympy.parsing.sympy_parser import implicit_multiplication, parse_expr, standard_transformations

from schemas import Completion, RewardStatus
from verifier_workers.rewards.base import Score, clip, infra_fail, policy_fail, timed_out

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_GSM8K_MARK = "####"

_WRAPPERS = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_NOISE = re.compile(r"\\left|\\right|\\[!,;:> ]|\^\s*\{?\\circ\}?|\\%|%|\\\$|\$|\\displaystyle")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_ASSIGNMENT = re.compile(r"^[A-Za-z]\s*=\s*(?!=)")
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_FRAC_SHORT = re.compile(r"\\[dt]?frac\s*(\d)\s*(\d)")
_SQRT_N = re.compile(r"\\sqrt\s*\[([^\[\]{}]*)\]\s*\{([^{}]*)\}")
_SQRT = re.compile(r"\\sqrt\s*\{([^{}]*)\}")
_LATEX_WORDS = {
    r"\cdot": "*",
    r"\times": "*",
    r"\div": "/",
    r"\pi": "pi",
    r"\infty": "oo",
    r"\ln": "log",
    r"\log": "log",
    r"\exp": "exp",
    r"\sin": "sin",
    r"\cos": "cos",
    r"\tan": "tan",
}

# What may reach sympy's parser: characters, names, size and powers.
_SAFE_CHARS = re.compile(r"^[0-9A-Za-z+\-*/().,\s]+$")
_NAME = re.compile(r"[A-Za-z_]\w*")
_FUNCTIONS = {"sqrt", "log", "exp", "sin", "cos", "tan", "pi", "oo"}
_DECIMAL = re.compile(r"\d*\.\d+|\d+\.")
_INTEGER = re.compile(r"\d+")
# After `**`: a small literal, a small fraction or a single symbol, and no second
# `**` straight after it (right-associative towers are the expensive case).
_SAFE_EXPONENT = re.compile(
    r"\*\*\s*(?:-?\d{1,2}|\(\s*-?\d{1,2}\s*(?:/\s*\d{1,2}\s*)?\)|[A-Za-z]|\(\s*[A-Za-z]\s*\))(?!\s*\*\*)"
)
MAX_SYMBOLIC_CHARS = 120
MAX_POWERS = 2
MAX_INTEGER_DIGITS = 12
_TRANSFORMS = standard_transformations + (implicit_multiplication,)
# Single letters are symbols, except the constants; sympy's own one-letter names
# (N, S, O, Q, ...) are functions and would make `N` an unparseable answer.
_LOCALS: dict[str, object] = {c: sympy.Symbol(c) for c in "ABCDFGHJKLMNOPQRSTUVWXYZabcdfghijklmnopqrstuvwxyz"}
_LOCALS.update({"e": sympy.E, "E": sympy.E, "I": sympy.I, "ln": sympy.log})


def _last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` whose braces balance (a truncated one is skipped)."""
    for match in reversed(list(_BOXED.finditer(text))):
        depth, i = 1, match.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[match.end() : i - 1]
    return None


def extract_answer(text: str) -> tuple[str, str] | None:
    """(answer, source) from a completion; source is `boxed`, `answer_tag` or `last_number`."""
    boxed = _last_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip(), "boxed"
    tags = _ANSWER_TAG.findall(text)
    if tags and tags[-1].strip():
        inner = tags[-1].strip()
        return (_last_boxed(inner) or inner).strip(), "answer_tag"
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1], "last_number"
    return None


def reference_answer(reference: str) -> str:
    """The answer inside a reference: its box or tags, the part after GSM8K's `####`, else all of it."""
    if _GSM8K_MARK in reference:
        reference = reference.rsplit(_GSM8K_MARK, 1)[1]
    found = _last_boxed(reference)
    if found is None:
        tags = _ANSWER_TAG.findall(reference)
        found = tags[-1] if tags else reference
    return found.strip()


def normalize(answer: str) -> str:
    """A canonical plain-text form: no dollars, units of typesetting, thousands commas or `x =`."""
    s = answer.strip()
    s = _WRAPPERS.sub(r"\1", s)
    s = _NOISE.sub("", s)
    s = s.replace(r"\(", "").replace(r"\)", "").replace(r"\[", "").replace(r"\]", "")
    s = _THOUSANDS.sub("", s)
    s = _ASSIGNMENT.sub("", s.strip())
    s = re.sub(r"\s+", " ", s).strip().rstrip(".").strip()
    return s


def latex_to_plain(s: str) -> str:
    """Rewrite the common LaTeX constructs (fractions, roots, operators) as plain math."""
    for _ in range(8):  # innermost first; eight levels of nesting is plenty for an answer
        rewritten = _FRAC.sub(r"((\1)/(\2))", s)
        rewritten = _FRAC_SHORT.sub(r"((\1)/(\2))", rewritten)
        rewritten = _SQRT_N.sub(r"((\2)**(1/(\1)))", rewritten)
        rewritten = _SQRT.sub(r"sqrt(\1)", rewritten)
        if rewritten == s:
            break
        s = rewritten
    for word, plain in _LATEX_WORDS.items():
        s = s.replace(word, plain)
    return s.replace("^", "**").replace("{", "(").replace("}", ")")


def as_fraction(s: str) -> Fraction | None:
    """An exact number from `s` (int, decimal, scientific, `a/b`), or None."""
    plain = s.replace("(", "").replace(")", "").replace(" ", "")
    if not plain or not re.fullmatch(r"[-+0-9.eE/]+", plain):
        return None
    try:
        if plain.count("/") == 1:
            num, den = plain.split("/")
            return Fraction(num) / Fraction(den)
        return Fraction(plain)
    except (ValueError, ZeroDivisionError):
        return None


def safe_sympy(s: str) -> sympy.Basic | None:
    """`s` parsed by sympy without evaluation, or None when it is unsafe or unparseable."""
    if len(s) > MAX_SYMBOLIC_CHARS or not _SAFE_CHARS.match(s) or "__" in s:
        return None
    if "." in _DECIMAL.sub("0", s):  # a dot that is not a decimal point is attribute access
        return None
    if any(len(name) > 1 and name not in _FUNCTIONS for name in _NAME.findall(s)):
        return None
    if any(len(digits) > MAX_INTEGER_DIGITS for digits in _INTEGER.findall(_DECIMAL.sub("0", s))):
        return None
    if s.count("**") > MAX_POWERS or s.count("**") != len(_SAFE_EXPONENT.findall(s)):
        return None
    try:
        return parse_expr(s, local_dict=dict(_LOCALS), transformations=_TRANSFORMS, evaluate=False)
    except Exception:  # noqa: BLE001 - sympy raises many types on bad input; all mean "not math"
        return None


def symbolically_equal(a: sympy.Basic, b: sympy.Basic, rel_tol: float) -> bool:
    """Whether two parsed answers are equal: numerically for constants, else by simplification."""
    try:
        if isinstance(a, sympy.Expr) and isinstance(b, sympy.Expr):
            if not a.free_symbols and not b.free_symbols:
                va, vb = complex(sympy.N(a)), complex(sympy.N(b))
                return abs(va - vb) <= rel_tol * max(1.0, abs(vb))
            return sympy.simplify(a - b) == 0
        return bool(sympy.simplify(a) == sympy.simplify(b))
    except Exception:  # noqa: BLE001 - an answer sympy cannot compute with is not equal
        return False


class MathReward:
    """Math answer correctness: components `correct` and `format`; scalar = `correct`."""

    name = "math"
    version = "1"

    def __init__(self, rel_tol: float = 1e-6, symbolic_timeout_s: float = 2.0) -> None:
        self.rel_tol = rel_tol
        self.symbolic_timeout_s = symbolic_timeout_s

    async def score(self, completion: Completion) -> Score:
        """OK with correct 1/0 when an answer is found, POLICY_FAIL when none is."""
        if not (completion.reference or "").strip():
            return infra_fail("request carries no reference")
        found = extract_answer(completion.text)
        if found is None:
            return policy_fail("no answer found", {"correct": 0.0, "format": 0.0})
        answer, source = found
        fmt = 0.0 if source == "last_number" else 1.0
        trace = {"answer": clip(answer, 200), "source": source}
        try:
            correct, method = await self._compare(
                normalize(answer), normalize(reference_answer(completion.reference or ""))
            )
        except TimeoutError:
            return timed_out("symbolic comparison timed out", {"correct": 0.0, "format": fmt}, trace)
        value = 1.0 if correct else 0.0
        return Score({"correct": value, "format": fmt}, value, RewardStatus.OK, {**trace, "method": method})

    async def _compare(self, answer: str, reference: str) -> tuple[bool, str]:
        if answer == reference:
            return True, "string"
        plain_a, plain_r = latex_to_plain(answer), latex_to_plain(reference)
        fa, fr = as_fraction(plain_a), as_fraction(plain_r)
        if fa is not None and fr is not None:
            return abs(fa - fr) <= Fraction(self.rel_tol) * max(Fraction(1), abs(fr)), "numeric"
        ea, er = safe_sympy(plain_a), safe_sympy(plain_r)
        if ea is None or er is None:
            return answer.casefold() == reference.casefold(), "string"
        # A thread, so the event loop keeps serving; the input limits above bound the
        # work, the deadline bounds what they miss (the thread is left to finish).
        equal = await asyncio.wait_for(
            asyncio.to_thread(symbolically_equal, ea, er, self.rel_tol), self.symbolic_timeout_s
        )
        return equal, "symbolic"


class FormattedMathReward:
    """The built-in task's reward: half for the answer format, half for a correct answer
    in that format. Components as `math` plus `success` (correct and in tags), the
    strict task success a held-out accuracy counts."""

    name = "math_format"
    version = "1"

    def __init__(self, inner: MathReward) -> None:
        self._inner = inner

    async def score(self, completion: Completion) -> Score:
        """`math`'s score with the shaped scalar; statuses unchanged."""
        base = await self._inner.score(completion)
        fmt = base.components.get("format", 0.0)
        success = fmt * base.components.get("correct", 0.0)
        scalar = 0.5 * fmt + 0.5 * success if base.status in (RewardStatus.OK, RewardStatus.POLICY_FAIL) else 0.0
        return Score({**base.components, "success": success}, scalar, base.status, base.trace)
