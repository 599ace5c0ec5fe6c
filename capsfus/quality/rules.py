"""The heuristic rules for fused captions, each a function registered with a name, a reason code,
an action (``strip`` or ``drop``) and its parameters with defaults. ``filters`` runs them."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from ..errors import UserError
from ..prompt import INSTRUCTION_LINES

WORD_RE = re.compile(r"[^\W_]+", re.UNICODE)       # letters and digits, for comparisons


TERMINAL = tuple(".!?…\"'”’)]»」")


def norm_words(text: str) -> list[str]:
    """Lowercased runs of letters and digits: what the comparison rules compare."""
    return WORD_RE.findall(text.lower())


@dataclass
class Ctx:
    """What a rule sees: the (stripped) fused text and the row's inputs."""

    text: str
    raw: str
    synthetic: str
    hit_max_tokens: bool | None
    _cache: dict = field(default_factory=dict)

    @property
    def inputs_lower(self) -> str:
        if "inl" not in self._cache:
            self._cache["inl"] = " ".join(f"{self.raw} \n {self.synthetic}".lower().split())
        return self._cache["inl"]

    def in_inputs(self, span: str) -> bool:
        """True when ``span`` (case and whitespace insensitive) is copied from an input."""
        return " ".join(span.lower().split()) in self.inputs_lower

    @property
    def words(self) -> list[str]:
        if "w" not in self._cache:
            self._cache["w"] = self.text.split()
        return self._cache["w"]


@dataclass(frozen=True)
class Rule:
    name: str
    code: str
    action: str                 # "strip" | "drop"
    doc: str
    defaults: dict
    fn: Callable


REGISTRY: dict[str, Rule] = {}


def rule(name: str, code: str, action: str = "drop", **defaults):
    """Registers ``fn(ctx, params)``: a drop rule returns a detail string when the row fails
    (None when it passes); a strip rule returns ``(new_text, detail)`` or None."""
    assert action in ("strip", "drop")

    def deco(fn):
        doc = (fn.__doc__ or "").strip()
        assert doc and "\n" not in doc, f"rule {name}: give it a one-line docstring"
        REGISTRY[name] = Rule(name, code, action, doc, {"enabled": True, **defaults}, fn)
        return fn
    return deco


def _first_match(patterns, ctx: Ctx, text: str | None = None) -> str | None:
    """The first match of any pattern that is not copied from the inputs."""
    text = ctx.text if text is None else text
    for pat in patterns:
        for m in pat.finditer(text):
            if not ctx.in_inputs(m.group(0)):
                return m.group(0)
    return None


def compile_patterns(patterns: list[str]) -> list[re.Pattern]:
    """One case-insensitive alternation of ``patterns`` (one pass over the text)."""
    if not patterns:
        return []
    try:
        for p in patterns:
            re.compile(p)
        return [re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE)]
    except re.error as e:
        raise UserError(f"filter config: bad regular expression: {e}") from None


# ------------------------------------------------------------------------------------ strip
_LABEL = (r"(?:sentence|caption|version|description|text|fusion|result|output|answer|"
          r"rewrite|combination)")


_PREAMBLE = re.compile(
    r"^\s*(?:"
    # "Sure!", "Certainly.", "Of course," before anything else
    r"(?:sure|certainly|of course|okay|ok|absolutely)\s*[!.,]\s*"
    r"|"
    # "Here is the merged sentence:", "Here's a refined and merged version of the caption:"
    r"here(?:'s|’s| is| are)\b[^:\n]{0,120}?\b" + _LABEL + r"s?\b[^:\n]{0,60}?:"
    r"|"
    # "New Sentence:", "Merged caption:", "The refined sentence is:", "Output:"
    r"(?:the\s+)?(?:(?:new|merged|combined|refined|fused|rewritten|final|improved|revised)"
    r"\s+)+" + _LABEL + r"(?:\s+(?:is|would be|reads))?\s*:"
    r"|(?:output|answer|result|caption|fused|merged)\s*:"
    r"|"
    # "... we can merge the two sentences as follows:", "Combining both captions, we get:"
    r"[^:\n]{0,200}?\b(?:merg|combin|fus|refin|rewrit|integrat|incorporat)\w*\b[^:\n]{0,160}?"
    r"\b(?:as follows|we get|we have|results? in|would be|could be|is|reads|"
    r"(?:new|single|merged|combined|refined)\s+" + _LABEL + r")\s*:"
    r")\s*", re.IGNORECASE)


_QUOTES = {'"': '"', "“": "”", "'": "'", "‘": "’", "«": "»"}


@rule("preamble", "preamble", action="strip")
def _preamble(ctx: Ctx, p: dict):
    """Strips a leading "Here is the merged sentence:", "New Sentence:" or "Sure!" and quotes."""
    text, cut = ctx.text, []
    for _ in range(3):                     # "Sure! Here is the merged sentence: ..."
        m = _PREAMBLE.match(text)
        if not m or m.end() == 0:
            break
        cut.append(m.group(0).strip())
        text = text[m.end():]
    if not cut:
        return None
    text = text.strip()
    if len(text) >= 2 and text[0] in _QUOTES:
        close = _QUOTES[text[0]]
        body = text[1:]
        for tail in (close, close + ".", "." + close):
            if body.endswith(tail) and close not in body[:-len(tail)]:
                body = body[:-len(tail)] + ("." if tail != close else "")
                text = body.strip()
                break
        else:
            if body.count(close) == 0:     # an opening quote only (truncated output)
                text = body.strip()
    return text, " | ".join(cut)[:200]


# ------------------------------------------------------------------------------------- drop
@rule("empty", "empty")
def _empty(ctx: Ctx, p: dict):
    """Drops an empty or whitespace-only output (or one with no letter or digit at all)."""
    if not ctx.text.strip():
        return "empty or whitespace only"
    if not WORD_RE.search(ctx.text):
        return "no letter or digit"
    return None


_REFUSAL = compile_patterns([
    r"\bas an? (?:ai|artificial intelligence)\b(?: language model| assistant| model)?",
    r"\bas a (?:large )?language model\b",
    r"\bI(?:'m|’m| am) (?:just )?an? (?:ai|language model|assistant)\b",
    r"\bI(?:'m|’m| am) (?:sorry|afraid)\b,? (?:but|I|that|for the confusion)\b",
    r"^\s*(?:I(?:'m|’m| am) )?sorry\s*[,.!]",
    r"\bI apologi[sz]e\b,? (?:but|for (?:the|any) (?:confusion|misunderstanding|inconvenience))",
    r"\bsorry,? but\b",
    r"\bI (?:cannot|can't|can’t|can not|am unable to|'m unable to|’m unable to|am not able to|"
    r"'m not able to|won't be able to|do not have|don't have)\s+(?:\w+\s+){0,2}?"
    r"(?:provide|help|assist|fulfil|fulfill|complete|create|generate|merge|combine|determine|"
    r"comply|answer|write|rewrite|refine|process|access|see|view|browse|enough information|"
    r"information|context)\b",
    r"\b(?:there is|there's|there are) (?:no|not enough|insufficient) "
    r"(?:information|context|details)\b",
    r"\bunable to (?:merge|combine|determine|provide|fulfil|fulfill)\b",
    r"\bnot possible to (?:merge|combine|determine)\b",
    r"\bI hope (?:this|that|it) helps\b",
    r"\blet me know if\b",
    r"\bfeel free to (?:ask|let me)\b.{0,40}\b(?:questions?|clarif\w*|modif\w*|changes?)\b",
    r"\bI(?:'ve|’ve| have) (?:merged|combined|refined|rewritten|created)\b",
    r"\bhere(?:'s| is) (?:the|a|my) (?:merged|combined|refined|new|rewritten|revised) "
    r"(?:sentence|caption|version)\b",
    r"(?:^|[\s(\[])note\s*:",
    r"\b(?:in this|the) (?:merged|combined|new|refined) (?:sentence|caption)\b",
    r"\bI (?:would|will) (?:merge|combine|rewrite|suggest)\b",
    r"\bhappy to help\b",
])


# Every _REFUSAL pattern needs one of these (lowercase) substrings.
_REFUSAL_KEYS = ("sorry", "apologi", " ai", "language model", "assistant", "artificial",
                 "can", "unable", "able to", "have", "there", "possible", "hope", "let me",
                 "feel free", "i've", "i’ve", "note", "merged", "combined", "refined", "new ",
                 "would", "will", "help", "rewritten", "revised")


@rule("refusal", "refusal", extra_patterns=[])
def _refusal(ctx: Ctx, p: dict):
    """Drops refusals and assistant chatter ("I'm sorry, but", "As an AI", "I hope this helps")."""
    low = ctx.text.lower()
    hit = None
    if any(k in low for k in _REFUSAL_KEYS):      # a cheap pre-check: most rows have none
        hit = _first_match(_REFUSAL, ctx)
    if hit is None and p["extra_patterns"]:
        hit = _first_match(compile_patterns(p["extra_patterns"]), ctx)
    return f"assistant phrase {hit!r}" if hit else None


_LEAK = compile_patterns([
    r"\bsentences?\s*(?:#\s*)?(?:1|2|one|two|no\.\s*[12])\b",
    r"\bnew sentence\b",
    r"\b(?:first|second|both|two|given|original|above|following|input|previous) "
    r"(?:given )?(?:sentences|captions)\b",
    r"\b(?:the|both) (?:first|second|given|original|input) (?:sentence|caption)\b",
    r"\bmerge and refine\b",
    r"\bsimply concatenat\w*",
])


def _instruction_ngrams(n: int) -> set[tuple[str, ...]]:
    words = norm_words(" ".join(INSTRUCTION_LINES))
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


_ECHO_CACHE: dict[int, set] = {}


def instruction_echo(text: str, inputs: str, n: int = 3) -> list[str]:
    """The runs of ``text`` made of instruction word n-grams not found in ``inputs``."""
    grams = _ECHO_CACHE.get(n)
    if grams is None:
        grams = _ECHO_CACHE[n] = _instruction_ngrams(n)
    w = norm_words(text)
    inp = None
    covered = [False] * len(w)
    for i in range(len(w) - n + 1):
        g = tuple(w[i:i + n])
        if g not in grams:
            continue
        if inp is None:
            inp = " " + " ".join(norm_words(inputs)) + " "
        if f" {' '.join(g)} " not in inp:
            for j in range(i, i + n):
                covered[j] = True
    runs, cur = [], []
    for word, c in zip(w, covered):
        if c:
            cur.append(word)
        elif cur:
            runs.append(" ".join(cur))
            cur = []
    if cur:
        runs.append(" ".join(cur))
    return runs


@rule("prompt_leak", "prompt_leak", echo_ngram=3, echo_min_words=6, extra_patterns=[])
def _prompt_leak(ctx: Ctx, p: dict):
    """Drops prompt leakage: "Sentence 1/2", "New Sentence", or echoes of the instruction."""
    pats = _LEAK + compile_patterns(p["extra_patterns"]) if p["extra_patterns"] else _LEAK
    hit = _first_match(pats, ctx)
    if hit:
        return f"prompt words {hit!r}"
    n = int(p["echo_ngram"])
    if n <= 0:
        return None
    runs = instruction_echo(ctx.text, ctx.inputs_lower, n)
    words = sum(len(r.split()) for r in runs)
    if words >= int(p["echo_min_words"]):
        return f"echoes {words} words of the instruction: " + "; ".join(repr(r) for r in runs)
    return None


_BULLET = re.compile(r"^\s*(?:[-*•·▪►✓✔]|\(?\d{1,2}[.)])\s+\S")


_INLINE_ITEMS = re.compile(r"(?:^|\s)(?:\(?\d{1,2}[.)]|[•▪►])\s+\S")


@rule("multiline", "multiline", max_lines=1, min_list_items=2)
def _multiline(ctx: Ctx, p: dict):
    """Drops multi-line output and lists (bullets, or enumerated items "1. … 2. …")."""
    lines = [ln for ln in ctx.text.strip().splitlines() if ln.strip()]
    if len(lines) > int(p["max_lines"]):
        return f"{len(lines)} lines"
    if _BULLET.match(ctx.text) and not ctx.in_inputs(ctx.text.strip()[:12]):
        return "starts with a list marker"
    items = _INLINE_ITEMS.findall(ctx.text)
    if len(items) >= int(p["min_list_items"]) and not _INLINE_ITEMS.findall(ctx.raw):
        marks = [m.strip() for m in items]
        if any(x.lstrip("(").startswith(("1.", "1)")) for x in marks) or \
                sum(x[0] in "•▪►" for x in marks) >= int(p["min_list_items"]):
            return f"{len(items)} list items"
    return None


_URL = re.compile(r"\b(?:https?://|ftp://|www\.)[^\s\"'<>)]+", re.IGNORECASE)


_HTML = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]{0,10}(?:\s[^<>]{0,200})?/?>|&(?:[a-zA-Z]{2,8}|#\d{2,6}"
                   r"|#x[0-9a-fA-F]{2,6});")


_CODE = compile_patterns([
    r"```", r"\bdef \w+\(", r"\bfunction\s*\w*\s*\(", r"\bconsole\.log\b", r"\bprint\(",
    r"\breturn\s+[\w\"'(\[]+\s*;", r"</?script", r"\{\{|\}\}", r"\w+\([^()\n]{0,80}\)\s*;",
    r"\bimport\s+\w+(?:\.\w+)*\s*(?:;|$)", r"\b(?:var|let|const)\s+\w+\s*=", r"=>", r"\\n",
    r"\bnull\b.*\bnull\b", r"\{\s*\"\w+\"\s*:",
])


# Every _CODE pattern needs one of these substrings (case-insensitive ones in both cases).
_CODE_KEYS = ("`", "(", "{", "}", "=", "\\n", "import", "IMPORT", "Import", "null", "NULL",
              "Null", "script", "SCRIPT", "Script")


_SYMBOL = re.compile(r"[^\w\s]|_")


@rule("garbage", "garbage", allow_urls_from_inputs=True, max_symbol_share=0.25,
      symbol_min_chars=20)
def _garbage(ctx: Ctx, p: dict):
    """Drops URL, HTML or code garbage, U+FFFD, and text that is mostly symbols."""
    for m in _URL.finditer(ctx.text):
        url = m.group(0).rstrip(".,;:!?")
        if not (p["allow_urls_from_inputs"] and (ctx.in_inputs(url) or _words_in(url, ctx))):
            return f"URL {url[:80]!r}"
    hit = _first_match([_HTML], ctx)
    if hit:
        return f"HTML {hit[:80]!r}"
    hit = _first_match(_CODE, ctx) if any(k in ctx.text for k in _CODE_KEYS) else None
    if hit:
        return f"code {hit[:80]!r}"
    if "\ufffd" in ctx.text:
        return "replacement character U+FFFD"
    t = "".join(ctx.text.split())
    if len(t) >= int(p["symbol_min_chars"]):
        sym = len(_SYMBOL.findall(t))
        if sym / len(t) > float(p["max_symbol_share"]):
            return f"{sym / len(t):.0%} symbols"
    return None


def _words_in(span: str, ctx: Ctx) -> bool:
    """True when the words of ``span`` appear, in order and together, in an input."""
    w = " ".join(norm_words(span))
    return bool(w) and f" {w} " in " " + " ".join(norm_words(ctx.inputs_lower)) + " "


def _repeat_run(words: list[str], max_n: int) -> tuple[int, int, int]:
    """(n, repeats, start) of the longest run of one n-gram repeated back to back."""
    best = (0, 1, 0)
    L = len(words)
    for n in range(1, max_n + 1):
        i = 0
        while i + 2 * n <= L:
            k = 1
            while i + (k + 1) * n <= L and words[i + k * n:i + (k + 1) * n] == words[i:i + n]:
                k += 1
            if k > best[1] or (k == best[1] and k > 1 and n > best[0]):
                best = (n, k, i)
            i += max(1, (k - 1) * n) if k > 1 else 1
    return best


@rule("repetition", "repetition", max_ngram=4, min_repeats=3, min_words_for_share=12,
      min_distinct_trigram_share=0.5, max_char_run=10)
def _repetition(ctx: Ctx, p: dict):
    """Drops degenerate repetition: n-gram loops, few distinct trigrams, character runs."""
    w = norm_words(ctx.text)
    max_n = int(p["max_ngram"])
    # cheap pre-checks: a back-to-back repeat needs w[j] == w[j + n] for some n <= max_n,
    # and few distinct trigrams need repeated words
    back_to_back = any(w[j] == w[j + n] for n in range(1, max_n + 1)
                       for j in range(len(w) - n))
    w_dups = len(w) - len(set(w)) >= 2
    n, k, i = _repeat_run(w, max_n) if back_to_back else (0, 1, 0)
    if k >= int(p["min_repeats"]):
        gram = " ".join(w[i:i + n])
        if not _words_in(" ".join([gram] * k), ctx):      # the raw may repeat itself
            return f"{gram!r} x{k}"
    if w_dups and len(w) >= int(p["min_words_for_share"]):
        tri = [tuple(w[j:j + 3]) for j in range(len(w) - 2)]
        share = len(set(tri)) / len(tri)
        if share < float(p["min_distinct_trigram_share"]):
            rw = norm_words(ctx.raw)
            rtri = [tuple(rw[j:j + 3]) for j in range(len(rw) - 2)]
            rshare = len(set(rtri)) / len(rtri) if rtri else 1.0
            if rshare >= float(p["min_distinct_trigram_share"]):
                return f"only {share:.0%} distinct word trigrams"
    m = re.search(r"(.)\1{%d,}" % int(p["max_char_run"]), ctx.text)
    if m and not m.group(1).isspace() and not ctx.in_inputs(m.group(0)):
        return f"character {m.group(1)!r} x{len(m.group(0))}"
    return None


JOINERS = frozenset({"and", "also", "plus", "then"})


def concat_distance(fused: list[str], concat: list[str], cap: int) -> int:
    """Word edit distance from ``concat`` to ``fused`` where deleting or substituting a word
    costs 1, inserting a joiner ("and", "also", ...) costs 0 and inserting any other word
    costs 2 (a glue verb such as "features" makes a naive fusion, not a concatenation);
    cap + 1 as soon as the distance must exceed ``cap``."""
    big = cap + 1
    prev = [0] * (len(fused) + 1)
    for j in range(1, len(fused) + 1):
        prev[j] = min(big, prev[j - 1] + (0 if fused[j - 1] in JOINERS else 2))
    for i in range(1, len(concat) + 1):
        cur = [min(big, prev[0] + 1)] + [0] * len(fused)
        ci = concat[i - 1]
        for j in range(1, len(fused) + 1):
            fj = fused[j - 1]
            cur[j] = min(big, prev[j] + 1,                              # delete ci
                         cur[j - 1] + (0 if fj in JOINERS else 2),      # insert fj
                         prev[j - 1] + (ci != fj))                      # keep or swap
        if min(cur) >= big:
            return big
        prev = cur
    return prev[-1]


@rule("concatenation", "concatenation", max_edit_share=0.05, min_words_from_each=1)
def _concatenation(ctx: Ctx, p: dict):
    """Drops a plain concatenation of raw and synthetic, either order, verbatim or nearly."""
    a, b = norm_words(ctx.raw), norm_words(ctx.synthetic)
    if not a or not b:
        return None
    f = norm_words(ctx.text)
    n = len(a) + len(b)
    cap = max(1, int(float(p["max_edit_share"]) * n))
    if not -cap <= len(f) - n <= cap + 3:
        return None
    have = Counter(f)
    for part in (a, b):
        # each input must be there: an output that is just the synthetic caption, beside a
        # one-word raw caption, is a (poor) fusion, not a concatenation
        got = sum(min(c, have[w]) for w, c in Counter(part).items())
        if got < max(int(p["min_words_from_each"]), len(part) - cap):
            return None
    for first, second, order in ((a, b, "raw + synthetic"), (b, a, "synthetic + raw")):
        d = concat_distance(f, first + second, cap)
        if d <= cap:
            return f"{order}, {d} word edit(s)"
    return None


_DANGLING = {
    "a", "an", "the", "and", "or", "but", "nor", "of", "to", "in", "on", "at", "by", "for",
    "with", "from", "into", "onto", "as", "than", "that", "which", "who", "whose", "whom",
    "where", "when", "while", "its", "their", "his", "her", "our", "your", "my", "is", "are",
    "was", "were", "be", "been", "being", "has", "have", "had", "this", "these", "those",
    "such", "including", "featuring", "like", "about", "between", "among", "over", "under",
    "through", "during", "without", "within", "also", "very", "more", "most", "both", "each",
    "either", "neither", "if", "because", "although", "though", "so", "not", "can", "will",
    "would", "should", "could", "may", "might", "must", "do", "does", "did", "per", "via",
    "upon", "after", "before", "since", "until", "whether", "then", "there", "it", "he", "she",
    "they", "we", "you", "i", "all", "any", "some", "no", "other", "another", "one", "two",
}


@rule("truncated", "truncated", heuristic_when_unknown=True)
def _truncated(ctx: Ctx, p: dict):
    """Drops output cut mid-sentence (hit max new tokens, or a dangling end when unknown)."""
    t = ctx.text.rstrip()
    if not t:
        return None
    ends_clean = t.endswith(TERMINAL)
    if ctx.hit_max_tokens is True:
        return None if ends_clean else f"hit max new tokens, ends {t[-30:]!r}"
    if ctx.hit_max_tokens is False or not p["heuristic_when_unknown"] or ends_clean:
        return None
    # an input that itself ends the same way (a cut alt-text copied) does not count
    tail = t.lower().split()[-3:]
    copied = any(x.lower().split()[-3:] == tail for x in (ctx.raw, ctx.synthetic) if x)
    if t.endswith((",", ";", ":", "(", "[", "{", "-", "–", "—", "/", "&", "+")):
        return None if copied else f"ends with {t[-1]!r}"
    last = norm_words(t[-40:])
    if last and last[-1] in _DANGLING and not copied:
        return f"ends on {last[-1]!r}"
    if t.count("(") > t.count(")") or t.count("“") > t.count("”") or t.count('"') % 2:
        return "unclosed bracket or quote at the end"
    return None


@rule("length", "length", min_words=3, max_words=120, max_chars=1000)
def _length(ctx: Ctx, p: dict):
    """Drops output with fewer than min_words or more than max_words words or max_chars chars."""
    n = len(ctx.words)
    if n < int(p["min_words"]):
        return f"{n} words < {p['min_words']}"
    if n > int(p["max_words"]):
        return f"{n} words > {p['max_words']}"
    if len(ctx.text) > int(p["max_chars"]):
        return f"{len(ctx.text)} chars > {p['max_chars']}"
    return None


@rule("relative_length", "length_relative", min_share_of_synthetic=0.5,
      max_ratio_to_inputs=4.0, slack_words=20)
def _relative_length(ctx: Ctx, p: dict):
    """Drops output far shorter than the synthetic caption or far longer than both inputs."""
    n = len(ctx.words)
    s = len(ctx.synthetic.split())
    r = len(ctx.raw.split())
    if s and n < float(p["min_share_of_synthetic"]) * s:
        return f"{n} words < {p['min_share_of_synthetic']} x {s} (synthetic)"
    limit = float(p["max_ratio_to_inputs"]) * (r + s) + float(p["slack_words"])
    if n > limit:
        return f"{n} words > {p['max_ratio_to_inputs']} x ({r} + {s}) + {p['slack_words']}"
    return None
